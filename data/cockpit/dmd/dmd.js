/* dmd's Cockpit page: pools, their volumes and dmd's jobs, read from dmd's
 * objects on the system bus and kept current by their signals (the
 * ObjectManager's InterfacesAdded/Removed and PropertiesChanged, which
 * cockpit.dbus's proxies follow): nothing is polled, so a change made by
 * dmctl beside the page shows at once. Every change is a D-Bus call to dmd,
 * allowed to ask for a password (polkit's dialog, "interactive"). A change
 * that runs as a Job is shown by its job; a refused call shows dmd's error
 * name and message.
 *
 * What is drawn is kept: each pool's card, each volume's row, each job's
 * line is made once and updated in place, and a row's buttons are made
 * again only when the actions it offers change. So a button keeps its focus
 * and a click is never lost to a signal arriving between press and release,
 * and what the person is typing in a form stays. */
"use strict";

const BUS_NAME = "org.example.DeviceMapper";
const ERROR_PREFIX = BUS_NAME + ".Error.";
const ROOT = "/org/example/DeviceMapper";
const IFACE = {
    manager: BUS_NAME + ".Manager",
    device: BUS_NAME + ".Device",
    pool: BUS_NAME + ".Pool",
    volume: BUS_NAME + ".Volume",
    job: BUS_NAME + ".Job",
};
const UNITS = { "": 1, K: 1 << 10, M: 1 << 20, G: 1 << 30, T: 2 ** 40 };
const NO_OPTIONS = {};
const CALL = { flags: "i" }; /* polkit may ask the person for a password */

const client = cockpit.dbus(BUS_NAME, { bus: "system", superuser: "try" });
const pools = client.proxies(IFACE.pool, ROOT);
const volumes = client.proxies(IFACE.volume, ROOT);
const jobs = client.proxies(IFACE.job, ROOT);
const devices = client.proxies(IFACE.device, ROOT);

const $ = id => document.getElementById(id);

/* -- numbers and words ------------------------------------------------------ */

function bytes(n) {
    n = Number(n);
    for (const [unit, size] of [["TiB", 2 ** 40], ["GiB", 1 << 30], ["MiB", 1 << 20], ["KiB", 1 << 10]]) {
        if (n >= size)
            return (n / size).toFixed(n % size ? 1 : 0) + " " + unit;
    }
    return n + " B";
}

/* "20G", "512M", "1.5 GiB", "4096": a size in bytes (binary units), or NaN. */
function parseSize(text) {
    const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$/i.exec(text);
    if (!m)
        return NaN;
    return Math.round(parseFloat(m[1]) * UNITS[m[2].toUpperCase()]);
}

function shortError(name) {
    return (name || "").replace(ERROR_PREFIX, "");
}

function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
        if (value === undefined || value === null || value === false)
            continue;
        if (key === "text")
            node.textContent = value;
        else if (key.startsWith("on"))
            node.addEventListener(key.slice(2), value);
        else
            node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
        if (child !== null && child !== undefined && child !== false)
            node.append(child);
    }
    return node;
}

/* The children of *container*, one per item, keyed: made by make(item) the
 * first time, brought up to date by update(node, item) each time, in the
 * items' order; those whose item went are removed. */
function keyed(container, items, keyOf, make, update) {
    const present = new Map([...container.children].map(node => [node.dataset.key, node]));
    items.forEach((item, index) => {
        const key = keyOf(item);
        let node = present.get(key);
        if (!node) {
            node = make(item);
            node.dataset.key = key;
        }
        present.delete(key);
        update(node, item);
        if (container.children[index] !== node)
            container.insertBefore(node, container.children[index] || null);
    });
    for (const node of present.values())
        node.remove();
}

/* Buttons in *cell*, made again only when the list of them changes:
 * specs are [label, text, class, action] with action() run at the click. */
function buttons(cell, specs) {
    const signature = specs.map(s => s.slice(0, 3).join("|")).join("\n");
    if (cell.dataset.buttons === signature) {
        specs.forEach((spec, i) => {
            cell.children[i].onclick = spec[3];
        });
        return;
    }
    cell.dataset.buttons = signature;
    cell.replaceChildren(...specs.map(([label, text, cls, action]) => {
        const button = el("button", { type: "button", "aria-label": label, class: cls || null, text });
        button.onclick = action;
        return button;
    }));
}

function setText(node, text) {
    if (node.textContent !== text)
        node.textContent = text;
}

/* A bar of used/total (role progressbar, named *label*, its value in words). */
function makeUsage(shown) {
    return el("div", { class: "usage" },
              el("span", { class: "usage-label", text: shown }),
              el("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100 },
                 el("div", { class: "bar-fill" })),
              el("span", { class: "usage-text" }));
}

function updateBar(bar, label, percent, words) {
    bar.setAttribute("aria-label", label);
    bar.setAttribute("aria-valuenow", percent);
    if (words)
        bar.setAttribute("aria-valuetext", words);
    bar.firstChild.style.width = `${percent}%`; /* CSSOM: the page's CSP forbids inline styles */
}

function updateUsage(node, label, used, total) {
    const percent = total > 0 ? Math.round(100 * used / total) : 0;
    const words = `${bytes(used)} of ${bytes(total)} (${percent}%)`;
    const bar = node.querySelector(".bar");
    updateBar(bar, label, percent, words);
    bar.classList.toggle("bar-high", percent >= 80);
    setText(node.querySelector(".usage-text"), words);
}

/* -- calls -------------------------------------------------------------------- */

function showProblem(what, error) {
    const name = shortError(error && error.name);
    $("problem-text").textContent = `${what}: ${name ? name + ": " : ""}${error.message || error}`;
    $("problem").hidden = false;
}

/* A call to dmd; a refusal is shown, and the promise settles either way. */
function call(what, path, iface, method, signature, args) {
    return client.call(path, iface, method, args, { ...CALL, type: signature })
            .catch(error => {
                showProblem(what, error);
                return null;
            });
}

/* dmctl with a passphrase on its standard input (then closed): dmctl hands
 * dmd a descriptor of it. Cockpit's bridge cannot pass a descriptor in a
 * D-Bus call, and a key is never a string on the bus, in argv or in a log. */
function dmctlWithKey(what, args, passphrase) {
    const process = cockpit.spawn(["dmctl", "--interactive", ...args, "--key-file", "-"],
                                  { superuser: "try", err: "message" });
    process.input(passphrase);
    return process.catch(error => {
        showProblem(what, { message: (error.message || String(error)).trim() });
        return null;
    });
}

/* -- what the page shows --------------------------------------------------------- */

/* Names of pools and volumes by object path, kept after they go: a job
 * names its subjects after they are deleted. */
const names = new Map();

function byName(a, b) {
    return (a.Name || "").localeCompare(b.Name || "");
}

function poolOf(volume) {
    return pools[volume.Pool];
}

/* What may be done to a volume now: only what dmd would not refuse at once. */
function volumeActions(volume) {
    const pool = poolOf(volume);
    const name = volume.Name;
    const path = volume.path;
    const here = () => volumes[path];
    if (!pool || pool.State !== "active" || pool.Mode === "damaged" || pool.ChangesRefused)
        return [];
    if (volume.State !== "active" && volume.State !== "inactive")
        return []; /* mid-operation: its job says how it goes */
    const origin = volume.Origin && volume.Origin !== "/" && volumes[volume.Origin];
    const specs = [];
    if (volume.State === "inactive") {
        specs.push([`Activate ${name}`, "Activate", null, () => volumeJob(here(), "Activate")]);
    } else {
        if (volume.Thin)
            specs.push([`Snapshot ${name}`, "Snapshot", null, () => snapshot(here())]);
        if (!volume.Encryption || volume.Locked)
            specs.push([`Grow ${name}`, "Grow", null, () => grow(here())]);
        if (volume.Encryption)
            specs.push(volume.Locked
                ? [`Unlock ${name}`, "Unlock", null, () => unlock(here())]
                : [`Lock ${name}`, "Lock", null, () => volumeJob(here(), "Lock")]);
        specs.push([`Deactivate ${name}`, "Deactivate", "secondary", () => volumeJob(here(), "Deactivate")]);
    }
    if (origin)
        specs.push([`Revert ${origin.Name} to ${name}`, "Revert origin", null, () => revert(here())]);
    specs.push([`Delete ${name}`, "Delete", "danger", () => remove(here())]);
    return specs;
}

function kindOf(volume) {
    const kind = [volume.Thin ? "thin" : "thick"];
    if (volume.Encryption)
        kind.push(volume.Locked ? "encrypted, locked" : "encrypted");
    if (volume.Cache)
        kind.push(`cache: ${volume.Cache}`);
    if (volume.RevertScheduled)
        kind.push("revert scheduled");
    return kind.join(", ");
}

function makeRow() {
    return el("tr", {}, el("th", { scope: "row" }), ...Array.from({ length: 5 }, () => el("td")),
              el("td", {}, el("div", { class: "actions" })));
}

function updateRow(row, volume) {
    const origin = volume.Origin && volume.Origin !== "/" && volumes[volume.Origin];
    row.dataset.volume = volume.Name;
    const cells = row.children;
    setText(cells[0], volume.Name);
    setText(cells[1], bytes(volume.Size));
    setText(cells[2], volume.Thin ? bytes(volume.UsedBytes) : "—");
    setText(cells[3], origin ? origin.Name : "—");
    setText(cells[4], volume.State);
    setText(cells[5], kindOf(volume));
    buttons(cells[6].firstChild, volumeActions(volume));
}

/* A pool's card, made once; its form stays the same element, so what the
 * person is typing survives the signals that keep arriving meanwhile. */
function makeCard(pool) {
    const path = pool.path;
    const titleId = `pool-${pool.UUID}`;
    const form = el("form", { class: "row" },
                    el("label", {}, "Name ", el("input", { name: "name", required: true, autocomplete: "off" })),
                    el("label", {}, "Size ", el("input", { name: "size", required: true, placeholder: "1G", size: 8 })),
                    el("label", {}, "Filesystem ",
                       el("select", { name: "filesystem" },
                          el("option", { value: "", text: "none" }),
                          el("option", { value: "ext4", text: "ext4" }),
                          el("option", { value: "xfs", text: "xfs" }))),
                    el("label", { class: "check" }, el("input", { type: "checkbox", name: "thick" }), " Thick"),
                    el("label", { class: "check" }, el("input", { type: "checkbox", name: "encrypt" }), " Encrypt"),
                    el("label", {}, "Passphrase ",
                       el("input", { type: "password", name: "passphrase", autocomplete: "new-password" })),
                    el("button", { type: "submit", text: "Create volume" }));
    form.addEventListener("submit", event => createVolume(event, pools[path]));
    const table = el("table", {},
                     el("thead", {}, el("tr", {}, ["Volume", "Size", "Used", "Origin", "State", "Kind", "Actions"]
                             .map(h => el("th", { scope: "col", text: h })))),
                     el("tbody"));
    return el("article", { class: "card pool", "aria-labelledby": titleId },
              el("div", { class: "pool-head" },
                 el("h3", { id: titleId }),
                 el("span", { class: "mode" }),
                 el("div", { class: "actions" })),
              el("p", { class: "help mode-help" }),
              el("p", { class: "help refused" }),
              el("div", { class: "usages" }, makeUsage("Data"), makeUsage("Metadata")),
              table,
              el("p", { class: "muted no-volumes", text: "No volume." }),
              form);
}

function poolActions(pool) {
    const name = pool.Name;
    const path = pool.path;
    const here = () => pools[path];
    if (pool.State === "active") {
        return [[`Stop ${name}`, "Stop", null, () => poolJob(here(), "Stop")],
            ...(pool.Mode === "damaged" || pool.Mode === "needs-check" || pool.Mode === "read-only"
                ? [[`Repair ${name}`, "Repair", null, () => poolJob(here(), "Repair")]] : []),
            [`Destroy ${name}`, "Destroy", "danger", () => destroy(here())]];
    }
    if (pool.State === "stopped") {
        const specs = [[`Start ${name}`, "Start", null, () => poolJob(here(), "Start")],
            [`Repair ${name}`, "Repair", null, () => poolJob(here(), "Repair")]];
        if (pool.Mode === "damaged") /* a damaged stopped pool may go without a Start */
            specs.push([`Destroy ${name}`, "Destroy", "danger", () => destroy(here())]);
        return specs;
    }
    return []; /* creating, stopping, ...: its job says how it goes */
}

function updateCard(card, pool) {
    const mine = Object.values(volumes).filter(v => v.Pool === pool.path).sort(byName);
    card.dataset.pool = pool.Name;
    const [head, modeHelp, refused, usages, table, empty, form] = card.children;
    setText(head.children[0], pool.Name);
    setText(head.children[1], `${pool.State}, ${pool.Mode}`);
    head.children[1].className = `mode mode-${pool.Mode}`;
    buttons(head.children[2], poolActions(pool));
    setText(modeHelp, pool.ModeHelp || "");
    modeHelp.hidden = !pool.ModeHelp;
    setText(refused, pool.ChangesRefused ? `Changes refused: ${pool.ChangesRefused}` : "");
    refused.hidden = !pool.ChangesRefused;
    updateUsage(usages.children[0], `Data of ${pool.Name}`, pool.DataUsed, pool.DataTotal);
    updateUsage(usages.children[1], `Metadata of ${pool.Name}`, pool.MetadataUsed, pool.MetadataTotal);
    table.setAttribute("aria-label", `Volumes of ${pool.Name}`);
    table.hidden = mine.length === 0;
    empty.hidden = mine.length > 0;
    keyed(table.tBodies[0], mine, v => v.path, makeRow, updateRow);
    form.setAttribute("aria-label", `New volume in ${pool.Name}`);
    form.hidden = pool.State !== "active" || pool.Mode === "damaged" || Boolean(pool.ChangesRefused);
}

function subjectNames(job) {
    return (job.Objects || []).map(path => names.get(path)).filter(Boolean).join(", ");
}

function jobWhat(job) {
    return `${job.Operation} ${subjectNames(job)}`.trim();
}

function makeJob() {
    return el("li", {},
              el("span", { class: "job-what" }),
              el("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100 },
                 el("div", { class: "bar-fill" })),
              el("span", { class: "job-state" }),
              el("span", { class: "job-error" }),
              el("div", { class: "actions" }));
}

function updateJob(item, job) {
    const what = jobWhat(job);
    const percent = Math.round(100 * (job.Progress || 0));
    const size = job.Bytes ? ` · ${bytes(job.Bytes)}` + (job.Rate ? ` at ${bytes(job.Rate)}/s` : "") : "";
    const [whatNode, bar, state, error, actions] = item.children;
    item.className = `job job-${job.State}`;
    item.dataset.job = job.path;
    setText(whatNode, what);
    updateBar(bar, `Progress of ${what}`, percent, null);
    setText(state, `${job.State} (${percent}%)${size}`);
    setText(error, job.ErrorMessage ? `${shortError(job.ErrorName)}: ${job.ErrorMessage}` : "");
    error.hidden = !job.ErrorMessage;
    const path = job.path;
    buttons(actions, job.State === "running" && job.Cancellable
        ? [[`Cancel ${what}`, "Cancel", "secondary",
            () => call("Cancel", path, IFACE.job, "Cancel", "a{sv}", [NO_OPTIONS])]]
        : []);
}

/* A job's end told once to screen readers (a polite live region), and a
 * failure shown as a refusal is. */
const jobStates = new Map();

function announceEnds() {
    for (const job of Object.values(jobs)) {
        const before = jobStates.get(job.path);
        jobStates.set(job.path, job.State);
        if (before === "running" && job.State !== "running") {
            const what = jobWhat(job);
            setText($("announce"), `${what}: ${job.State}`);
            if (job.State === "failed")
                showProblem(what, { name: job.ErrorName, message: job.ErrorMessage });
        }
    }
}

let scheduled = false;

/* Bring everything up to date, once a frame however many signals came. */
function render() {
    if (scheduled)
        return;
    scheduled = true;
    window.requestAnimationFrame(() => {
        scheduled = false;
        for (const proxy of [...Object.values(pools), ...Object.values(volumes)])
            names.set(proxy.path, proxy.Name);
        keyed($("pools"), Object.values(pools).sort(byName), p => p.path, makeCard, updateCard);
        $("no-pools").hidden = Object.keys(pools).length > 0;
        const list = Object.values(jobs).sort((a, b) => Number(b.StartTime) - Number(a.StartTime));
        keyed($("jobs"), list, j => j.path, makeJob, updateJob);
        $("no-jobs").hidden = list.length > 0;
        announceEnds();
    });
}

/* -- the disks a new pool may take ---------------------------------------------- */

/* As dmd judges them now (Manager.ListDisks: no signal says a disk came or
 * went, so asked again as pools change, and on request). */
let disks = [];

function loadDisks() {
    client.call(ROOT, IFACE.manager, "ListDisks", [NO_OPTIONS], { type: "a{sv}" })
            .then(([list]) => {
                disks = list;
                renderDisks();
            })
            .catch(error => {
                disks = [];
                renderDisks();
                /* the pool action is an administrator's: said where the
                 * disks would be, not as an alarm at every page load */
                $("no-disks").textContent = shortError(error.name) === "NotAuthorized"
                    ? "Listing disks needs administrative access (see Cockpit's top bar)."
                    : `No disks: ${error.message || error}`;
            });
}

function renderDisks() {
    const form = $("new-pool");
    const force = form.force.checked;
    const chosen = new Set([...form.querySelectorAll("input[name=disk]:checked")].map(i => i.value));
    $("disks").replaceChildren(...disks.map(([path, size, signature, busy], index) => {
        const blocked = Boolean(busy || (signature && !force));
        const why = busy || (signature ? `has a ${signature} signature` : "");
        const id = `disk-${index}`;
        return el("li", {},
                  el("input", {
                      type: "checkbox", name: "disk", value: path, id,
                      disabled: blocked, checked: chosen.has(path) && !blocked
                  }),
                  el("label", { for: id, class: "check" }, `${path}, ${bytes(size)}`,
                     why ? el("span", { class: "muted", text: ` (${why})` }) : null));
    }));
    $("no-disks").hidden = disks.length > 0;
}

/* -- changes ---------------------------------------------------------------------- */

function createPool(event) {
    event.preventDefault();
    const form = event.target;
    const devices = [...form.querySelectorAll("input[name=disk]:checked")].map(i => i.value);
    if (!devices.length) {
        showProblem(`Create pool ${form.name.value}`, { message: "choose one or more disks" });
        return;
    }
    const options = form.force.checked ? { force: { t: "b", v: true } } : NO_OPTIONS;
    call(`Create pool ${form.name.value}`, ROOT, IFACE.manager, "CreatePool", "sasa{sv}",
         [form.name.value, devices, options]).then(reply => {
        if (reply) {
            form.reset();
            renderDisks();
        }
    });
}

function createVolume(event, pool) {
    event.preventDefault();
    const form = event.target;
    const what = `Create volume ${form.name.value}`;
    const size = parseSize(form.size.value);
    if (!(size > 0)) {
        showProblem(what, { message: `${form.size.value} is not a size (say 1G or 512M)` });
        return;
    }
    const passphrase = form.passphrase.value;
    form.passphrase.value = "";
    if (passphrase && !form.encrypt.checked) {
        showProblem(what, { message: "a passphrase was typed but Encrypt is not ticked: tick it, or leave the passphrase empty" });
        return;
    }
    if (form.encrypt.checked) {
        if (!passphrase) {
            showProblem(what, { message: "an encrypted volume needs a passphrase" });
            return;
        }
        const args = ["vol-create", pool.Name, form.name.value, String(size), "--encrypt", "--no-wait"];
        if (form.filesystem.value)
            args.push("--filesystem", form.filesystem.value);
        if (form.thick.checked)
            args.push("--thick");
        dmctlWithKey(what, args, passphrase).then(out => {
            if (out !== null)
                form.reset();
        });
        return;
    }
    const options = {};
    if (form.filesystem.value)
        options.filesystem = { t: "s", v: form.filesystem.value };
    if (form.thick.checked)
        options.thin = { t: "b", v: false };
    call(what, pool.path, IFACE.pool, "CreateVolume", "sta{sv}",
         [form.name.value, size, options]).then(reply => {
        if (reply)
            form.reset();
    });
}

function snapshot(volume) {
    const name = window.prompt(`Name of the snapshot of ${volume.Name}`, `${volume.Name}.snap`);
    if (name)
        call(`Snapshot ${volume.Name}`, volume.path, IFACE.volume, "Snapshot", "sa{sv}", [name, NO_OPTIONS]);
}

function grow(volume) {
    const text = window.prompt(`New size of ${volume.Name} (now ${bytes(volume.Size)})`, "");
    if (!text)
        return;
    const size = parseSize(text);
    if (!(size > 0)) {
        showProblem(`Grow ${volume.Name}`, { message: `${text} is not a size` });
        return;
    }
    /* its filesystem with it, where udev found one on its device */
    const device = volume.Device && devices[volume.Device];
    const options = device && device.FilesystemType ? { filesystem: { t: "b", v: true } } : NO_OPTIONS;
    call(`Grow ${volume.Name}`, volume.path, IFACE.volume, "Resize", "ta{sv}", [size, options]);
}

function revert(snap) {
    const origin = volumes[snap.Origin];
    if (origin && window.confirm(`Revert ${origin.Name} to ${snap.Name}? What was written to ${origin.Name} since is lost.`))
        call(`Revert ${origin.Name}`, snap.path, IFACE.volume, "Revert", "a{sv}", [NO_OPTIONS]);
}

function remove(volume) {
    if (window.confirm(`Delete ${volume.Name} and its data?`))
        call(`Delete ${volume.Name}`, volume.path, IFACE.volume, "Delete", "a{sv}", [NO_OPTIONS]);
}

/* A volume's method that takes options alone (Activate, Deactivate, Lock). */
function volumeJob(volume, method) {
    call(`${method} ${volume.Name}`, volume.path, IFACE.volume, method, "a{sv}", [NO_OPTIONS]);
}

/* The passphrase asked for in a dialog of the page's own (a prompt would
 * show it as it is typed); the field is emptied however the dialog closes. */
function unlock(volume) {
    const dialog = $("unlock");
    const form = $("unlock-form");
    $("unlock-title").textContent = `Unlock ${volume.Name}`;
    form.passphrase.value = "";
    form.onsubmit = () => {
        const passphrase = form.passphrase.value;
        form.passphrase.value = "";
        dmctlWithKey(`Unlock ${volume.Name}`, ["unlock", volume.PoolName, volume.Name], passphrase);
    };
    dialog.showModal();
}

function poolJob(pool, method) {
    call(`${method} ${pool.Name}`, pool.path, IFACE.pool, method, "a{sv}", [NO_OPTIONS]);
}

/* Counted and named when asked: what force destroys is what was shown. */
function destroy(pool) {
    const mine = Object.values(volumes).filter(v => v.Pool === pool.path).map(v => v.Name).sort();
    const also = mine.length ? ` and its volumes (${mine.join(", ")}), data and all` : "";
    if (window.confirm(`Destroy ${pool.Name}${also}?`)) {
        call(`Destroy ${pool.Name}`, pool.path, IFACE.pool, "Destroy", "a{sv}",
             [mine.length ? { force: { t: "b", v: true } } : NO_OPTIONS]);
    }
}

/* -- start ---------------------------------------------------------------------------- */

for (const proxies of [pools, volumes, jobs]) {
    for (const event of ["added", "changed", "removed"])
        proxies.addEventListener(event, render);
}

/* The disks are asked for again when a pool comes, goes, or moves from one
 * state to another (its disks are taken once it is made, free once
 * destroyed), not at each of its usage figures. */
let poolStates = "";
for (const event of ["added", "changed", "removed"]) {
    pools.addEventListener(event, () => {
        const now = Object.values(pools).map(p => `${p.path} ${p.State}`).sort().join("\n");
        if (now !== poolStates) {
            poolStates = now;
            loadDisks();
        }
    });
}

let loaded = false;
let absent = false; /* dmd was not on the bus at some point */

function connected() {
    loaded = true;
    $("app").removeAttribute("aria-busy");
    $("connection").textContent = "Connected to dmd.";
    $("reload").hidden = true;
    render();
    loadDisks();
}

function lost(why) {
    $("app").removeAttribute("aria-busy");
    $("connection").textContent = why;
    $("reload").hidden = false;
}

client.addEventListener("owner", (event, owner) => {
    if (!owner) {
        absent = true;
        lost("dmd is not running: what is shown may be out of date.");
    } else if (absent && !loaded) {
        window.location.reload(); /* dmd started after the page: read it all */
    } else if (loaded) {
        $("connection").textContent = "Connected to dmd.";
        $("reload").hidden = true;
    }
});

client.addEventListener("close", (event, options) => {
    lost(`Lost dmd: ${options.problem || "closed"}`);
});

/* A page opened while dmd is away (its client gives up, "not-found") reads
 * everything again once dmd takes its name: the bus says when. */
cockpit.dbus("org.freedesktop.DBus", { bus: "system" }).subscribe(
    { path: "/org/freedesktop/DBus", interface: "org.freedesktop.DBus", member: "NameOwnerChanged", arg0: BUS_NAME },
    (path, iface, signal, args) => {
        if (args[2] && !loaded)
            window.location.reload();
    });

$("new-pool").addEventListener("submit", createPool);
$("new-pool").force.addEventListener("change", renderDisks);
$("disks-refresh").addEventListener("click", loadDisks);
$("reload").addEventListener("click", () => window.location.reload());
$("problem-close").addEventListener("click", () => {
    $("problem").hidden = true;
});
$("unlock").addEventListener("close", () => {
    $("unlock-form").passphrase.value = "";
});
$("unlock-cancel").addEventListener("click", () => $("unlock").close());

Promise.all([pools.wait(), volumes.wait(), jobs.wait(), devices.wait()])
        .then(connected)
        .catch(error => lost(`dmd cannot be reached: ${error.message || error}`));
