/* dmd's Cockpit page: pools, their volumes and dmd's jobs, read from dmd's
 * objects on the system bus and kept current by their signals (the
 * ObjectManager's InterfacesAdded/Removed and PropertiesChanged, which
 * cockpit.dbus's proxies follow): nothing is polled, so a change made by
 * dmctl beside the page shows at once. Every change is a D-Bus call to dmd;
 * polkit asks the person for a password where one is needed ("superuser":
 * "try"). A change that runs as a Job is shown by its job; a refused call
 * shows dmd's error name and message. */
"use strict";

const BUS_NAME = "org.example.DeviceMapper";
const ROOT = "/org/example/DeviceMapper";
const IFACE = {
    manager: BUS_NAME + ".Manager",
    pool: BUS_NAME + ".Pool",
    volume: BUS_NAME + ".Volume",
    job: BUS_NAME + ".Job",
};
const UNITS = { "": 1, K: 1 << 10, M: 1 << 20, G: 1 << 30, T: 2 ** 40 };

const client = cockpit.dbus(BUS_NAME, { bus: "system", superuser: "try" });
const pools = client.proxies(IFACE.pool, ROOT);
const volumes = client.proxies(IFACE.volume, ROOT);
const jobs = client.proxies(IFACE.job, ROOT);

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

function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
        if (value === undefined || value === null || value === false)
            continue;
        if (key === "text")
            node.textContent = value;
        else if (key === "style")
            node.style.cssText = value; /* not an attribute: the page's CSP forbids inline styles */
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

/* A bar of used/total (role progressbar, named *label*, its value in words). */
function usage(shown, label, used, total) {
    const percent = total > 0 ? Math.round(100 * used / total) : 0;
    const words = `${bytes(used)} of ${bytes(total)} (${percent}%)`;
    return el("div", { class: "usage" },
              el("span", { class: "usage-label", text: shown }),
              el("div", {
                  class: "bar" + (percent >= 80 ? " bar-high" : ""), role: "progressbar",
                  "aria-label": label, "aria-valuemin": 0, "aria-valuemax": 100,
                  "aria-valuenow": percent, "aria-valuetext": words
              }, el("div", { class: "bar-fill", style: `width: ${percent}%` })),
              el("span", { class: "usage-text", text: words }));
}

/* -- calls -------------------------------------------------------------------- */

function showProblem(what, error) {
    const name = (error && error.name ? error.name : "").replace(BUS_NAME + ".Error.", "");
    $("problem-text").textContent = `${what}: ${name ? name + ": " : ""}${error.message || error}`;
    $("problem").hidden = false;
}

/* A call to dmd; a refusal is shown, and the promise settles either way. */
function call(what, path, iface, method, signature, args) {
    return client.call(path, iface, method, args, { type: signature })
            .catch(error => {
                showProblem(what, error);
                return null;
            });
}

const NO_OPTIONS = {};

/* dmctl with a passphrase on its standard input (then closed): dmctl hands
 * dmd a descriptor of it. Cockpit's bridge cannot pass a descriptor in a
 * D-Bus call, and a key is never a string on the bus, in argv or in a log. */
function dmctlWithKey(what, args, passphrase) {
    const process = cockpit.spawn(["dmctl", ...args, "--key-file", "-"],
                                  { superuser: "try", err: "message" });
    process.input(passphrase);
    return process.catch(error => {
        showProblem(what, { message: (error.message || String(error)).trim() });
        return null;
    });
}

/* -- what the page shows --------------------------------------------------------- */

function byName(a, b) {
    return (a.Name || "").localeCompare(b.Name || "");
}

function volumeRow(volume) {
    const origin = volume.Origin && volume.Origin !== "/" && volumes[volume.Origin];
    const kind = [volume.Thin ? "thin" : "thick"];
    if (volume.Encryption)
        kind.push(volume.Locked ? "encrypted, locked" : "encrypted");
    if (volume.Cache)
        kind.push(`cache: ${volume.Cache}`);
    if (volume.RevertScheduled)
        kind.push("revert scheduled");
    const name = volume.Name;
    /* mid-operation (creating, deleting, ...): its job says how it goes */
    const settled = volume.State === "active" || volume.State === "inactive";
    const actions = settled && el("div", { class: "actions" },
                       el("button", {
                           type: "button", "aria-label": `Snapshot ${name}`, text: "Snapshot",
                           onclick: () => snapshot(volume)
                       }),
                       el("button", {
                           type: "button", "aria-label": `Grow ${name}`, text: "Grow",
                           onclick: () => grow(volume)
                       }),
                       volume.Encryption ? el("button", {
                           type: "button", "aria-label": `${volume.Locked ? "Unlock" : "Lock"} ${name}`,
                           text: volume.Locked ? "Unlock" : "Lock",
                           onclick: () => volume.Locked ? unlock(volume) : lock(volume)
                       }) : null,
                       origin ? el("button", {
                           type: "button", "aria-label": `Revert ${origin.Name} to ${name}`,
                           text: "Revert origin", onclick: () => revert(volume, origin)
                       }) : null,
                       el("button", {
                           type: "button", class: "danger", "aria-label": `Delete ${name}`,
                           text: "Delete", onclick: () => remove(volume)
                       }));
    return el("tr", { "data-volume": name },
              el("th", { scope: "row", text: name }),
              el("td", { text: bytes(volume.Size) }),
              el("td", { text: volume.Thin ? bytes(volume.UsedBytes) : "—" }),
              el("td", { text: origin ? origin.Name : "—" }),
              el("td", { text: volume.State }),
              el("td", { text: kind.join(", ") }),
              el("td", {}, actions));
}

/* A pool's card: made once, its data filled again at each change; its
 * form stays the same node, so what the person is typing survives the
 * signals that keep arriving meanwhile. */
const cards = new Map(); /* pool path -> { root, data, form } */

function makeCard(path) {
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
    const data = el("div");
    return { root: el("article", { class: "card pool" }, data, form), data, form };
}

function fillCard(card, pool) {
    const mine = Object.values(volumes).filter(v => v.Pool === pool.path).sort(byName);
    const stopped = pool.State === "stopped";
    /* mid-operation (creating, stopping, ...): its job says how it goes */
    const settled = stopped || pool.State === "active";
    const titleId = `pool-${pool.UUID}`;
    card.root.setAttribute("aria-labelledby", titleId);
    card.root.setAttribute("data-pool", pool.Name);
    card.form.setAttribute("aria-label", `New volume in ${pool.Name}`);
    card.form.hidden = !settled || stopped;
    const table = mine.length
        ? el("table", { "aria-label": `Volumes of ${pool.Name}` },
             el("thead", {}, el("tr", {}, ["Volume", "Size", "Used", "Origin", "State", "Kind", "Actions"]
                     .map(h => el("th", { scope: "col", text: h })))),
             el("tbody", {}, mine.map(volumeRow)))
        : el("p", { class: "muted", text: "No volume." });
    card.data.replaceChildren(...[
        el("div", { class: "pool-head" },
           el("h3", { id: titleId, text: pool.Name }),
           el("span", { class: `mode mode-${pool.Mode}`, text: `${pool.State}, ${pool.Mode}` }),
           settled && el("div", { class: "actions" },
              el("button", {
                  type: "button", "aria-label": `${stopped ? "Start" : "Stop"} ${pool.Name}`,
                  text: stopped ? "Start" : "Stop",
                  onclick: () => poolJob(pool, stopped ? "Start" : "Stop")
              }),
              pool.Mode === "damaged" || stopped ? el("button", {
                  type: "button", "aria-label": `Repair ${pool.Name}`, text: "Repair",
                  onclick: () => poolJob(pool, "Repair")
              }) : null,
              el("button", {
                  type: "button", class: "danger", "aria-label": `Destroy ${pool.Name}`,
                  text: "Destroy", onclick: () => destroy(pool, mine.length)
              }))),
        pool.ModeHelp ? el("p", { class: "help", text: pool.ModeHelp }) : null,
        pool.ChangesRefused ? el("p", { class: "help", text: `Changes refused: ${pool.ChangesRefused}` }) : null,
        el("div", { class: "usages" },
           usage("Data", `Data of ${pool.Name}`, pool.DataUsed, pool.DataTotal),
           usage("Metadata", `Metadata of ${pool.Name}`, pool.MetadataUsed, pool.MetadataTotal)),
        table].filter(Boolean));
}

function renderPools() {
    const container = $("pools");
    for (const [path, card] of cards) {
        if (!pools[path]) {
            card.root.remove();
            cards.delete(path);
        }
    }
    Object.values(pools).sort(byName).forEach((pool, index) => {
        let card = cards.get(pool.path);
        if (!card) {
            card = makeCard(pool.path);
            cards.set(pool.path, card);
        }
        fillCard(card, pool);
        if (container.children[index] !== card.root)
            container.insertBefore(card.root, container.children[index] || null);
    });
    $("no-pools").hidden = cards.size > 0;
}

function subjectNames(job) {
    return (job.Objects || []).map(path => (pools[path] || volumes[path] || {}).Name)
            .filter(Boolean).join(", ");
}

function jobItem(job) {
    const running = job.State === "running";
    const percent = Math.round(100 * (job.Progress || 0));
    const what = `${job.Operation} ${subjectNames(job)}`.trim();
    const size = job.Bytes ? ` · ${bytes(job.Bytes)}` + (job.Rate ? ` at ${bytes(job.Rate)}/s` : "") : "";
    return el("li", { class: `job job-${job.State}`, "data-job": job.path },
              el("span", { class: "job-what", text: what }),
              el("div", {
                  class: "bar", role: "progressbar", "aria-label": `Progress of ${what}`,
                  "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": percent
              }, el("div", { class: "bar-fill", style: `width: ${percent}%` })),
              el("span", { class: "job-state", text: `${job.State} (${percent}%)${size}` }),
              job.ErrorMessage ? el("span", { class: "job-error", text: `${job.ErrorName}: ${job.ErrorMessage}` }) : null,
              running && job.Cancellable ? el("button", {
                  type: "button", "aria-label": `Cancel ${what}`, text: "Cancel",
                  onclick: () => call("Cancel", job.path, IFACE.job, "Cancel", "a{sv}", [NO_OPTIONS])
              }) : null);
}

let scheduled = false;

/* Render everything again, once a frame however many signals came. */
function render() {
    if (scheduled)
        return;
    scheduled = true;
    window.requestAnimationFrame(() => {
        scheduled = false;
        renderPools();
        const list = Object.values(jobs).sort((a, b) => Number(b.StartTime) - Number(a.StartTime));
        $("jobs").replaceChildren(...list.map(jobItem));
        $("no-jobs").hidden = list.length > 0;
    });
}

/* -- changes ---------------------------------------------------------------------- */

/* The disks a pool may be made on, as dmd judges them now (Manager.ListDisks:
 * no signal says a disk came or went, so asked again as pools change, and on
 * request). */
let disks = [];

function loadDisks() {
    client.call(ROOT, IFACE.manager, "ListDisks", [NO_OPTIONS], { type: "a{sv}" })
            .then(([list]) => {
                disks = list;
                renderDisks();
            })
            .catch(error => showProblem("Look for disks", error));
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
    const size = parseSize(form.size.value);
    if (!(size > 0)) {
        showProblem("Create volume", { message: `${form.size.value} is not a size (say 1G or 512M)` });
        return;
    }
    const what = `Create volume ${form.name.value}`;
    if (form.encrypt.checked) {
        const passphrase = form.passphrase.value;
        if (!passphrase) {
            showProblem(what, { message: "an encrypted volume needs a passphrase" });
            return;
        }
        form.passphrase.value = "";
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
    const options = volume.Encryption ? NO_OPTIONS : { filesystem: { t: "b", v: true } };
    call(`Grow ${volume.Name}`, volume.path, IFACE.volume, "Resize", "ta{sv}", [size, options]);
}

function revert(snap, origin) {
    if (window.confirm(`Revert ${origin.Name} to ${snap.Name}? What was written to ${origin.Name} since is lost.`))
        call(`Revert ${origin.Name}`, snap.path, IFACE.volume, "Revert", "a{sv}", [NO_OPTIONS]);
}

function remove(volume) {
    if (window.confirm(`Delete ${volume.Name} and its data?`))
        call(`Delete ${volume.Name}`, volume.path, IFACE.volume, "Delete", "a{sv}", [NO_OPTIONS]);
}

function lock(volume) {
    call(`Lock ${volume.Name}`, volume.path, IFACE.volume, "Lock", "a{sv}", [NO_OPTIONS]);
}

/* The passphrase asked for in a dialog of the page's own (a prompt would
 * show it as it is typed). */
function unlock(volume) {
    const dialog = $("unlock");
    const form = $("unlock-form");
    $("unlock-title").textContent = `Unlock ${volume.Name}`;
    form.passphrase.value = "";
    form.onsubmit = () => {
        const passphrase = form.passphrase.value;
        form.passphrase.value = "";
        const pool = pools[volume.Pool];
        dmctlWithKey(`Unlock ${volume.Name}`, ["unlock", pool ? pool.Name : "", volume.Name],
                     passphrase);
    };
    dialog.showModal();
}

function poolJob(pool, method) {
    call(`${method} ${pool.Name}`, pool.path, IFACE.pool, method, "a{sv}", [NO_OPTIONS]);
}

function destroy(pool, count) {
    const also = count ? ` and its ${count} volume(s), data and all` : "";
    if (window.confirm(`Destroy ${pool.Name}${also}?`)) {
        call(`Destroy ${pool.Name}`, pool.path, IFACE.pool, "Destroy", "a{sv}",
             [count ? { force: { t: "b", v: true } } : NO_OPTIONS]);
    }
}

/* -- start ---------------------------------------------------------------------------- */

for (const proxies of [pools, volumes, jobs]) {
    for (const event of ["added", "changed", "removed"])
        proxies.addEventListener(event, render);
}
/* Asked again when a pool comes, goes, or moves from one state to another
 * (its disks are taken once it is made, free once destroyed), not at each
 * of its usage figures. */
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

client.addEventListener("owner", (event, owner) => {
    $("connection").textContent = owner ? "Connected to dmd." : "dmd is not running.";
});

client.addEventListener("close", (event, options) => {
    $("connection").textContent = `Lost dmd: ${options.problem || "closed"}`;
});

$("new-pool").addEventListener("submit", createPool);
$("new-pool").force.addEventListener("change", renderDisks);
$("disks-refresh").addEventListener("click", loadDisks);
$("problem-close").addEventListener("click", () => {
    $("problem").hidden = true;
});
$("unlock-cancel").addEventListener("click", () => {
    $("unlock-form").passphrase.value = "";
    $("unlock").close();
});

Promise.all([pools.wait(), volumes.wait(), jobs.wait()]).then(() => {
    $("app").removeAttribute("aria-busy");
    $("connection").textContent = "Connected to dmd.";
    render();
    loadDisks();
});
