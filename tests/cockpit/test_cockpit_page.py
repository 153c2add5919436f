"""dmd's Cockpit page, driven in headless chromium as a person would: a pool
made from the form, a volume with a filesystem (its job's progress shown,
then its end), a snapshot, a change made beside the page with dmctl
appearing without a reload, a refused change showing dmd's error, a delete;
an encrypted volume made with a passphrase typed in the page, locked, and
unlocked in the page's dialog (a wrong passphrase refused); each main view's
screenshot kept, and axe-core's accessibility rules passing on each
(labels, roles, names)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By

from dmd.engine.sim import SimDM
from tests.cockpit.page import (
    SHOTS,
    accessible,
    button,
    cells,
    create_volume,
    disk_box,
    fill,
    job_text,
    press,
    screenshot,
    text,
    texts,
    until,
    volume_names,
)

PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def disks(dmd_session: Any) -> list[str]:
    sim = SimDM(dmd_session.sim)
    paths = [f"/dev/simdisk{i}" for i in (1, 2)]
    for i, path in enumerate(paths, start=1):
        sim.add_disk(path, 7, i, 4096 * 2048)
    return paths


def test_pools_volumes_and_jobs_in_the_browser(browser: Any, dmd_session: Any,
                                               disks: list[str]) -> None:
    driver = browser
    until(driver, lambda d: "Connected to dmd." in text(d), "its connection")
    until(driver, lambda d: d.find_element(By.ID, "no-pools").is_displayed(), "no pool")
    screenshot(driver, "empty")
    accessible(driver, "the empty page")

    # A pool from the form, its disk picked from those dmd lists.
    until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "input[name=disk]")) == 2,
          "the disks")
    form = driver.find_element(By.ID, "new-pool")
    fill(form, name="tank")
    disk_box(driver, disks[0]).click()
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    until(driver, lambda d: texts(d, "article[data-pool='tank'] .mode") == ["active, ok"],
          "the pool made")
    bars = driver.execute_script(
        "return [...document.querySelectorAll(\"article[data-pool='tank'] [role=progressbar]\")]"
        ".map(b => b.getAttribute('aria-label'))")
    assert bars == ["Data of tank", "Metadata of tank"]
    card = texts(driver, "article[data-pool='tank']")[0]
    assert "null" not in card and "undefined" not in card and "NaN" not in card, card
    # the disk is the pool's now: listed, not to be picked
    until(driver, lambda d: disk_box(d, disks[0]).get_attribute("disabled") is not None,
          "the pool's disk taken")
    assert "a device of pool tank" in "".join(texts(driver, "#disks li"))
    assert disk_box(driver, disks[1]).get_attribute("disabled") is None

    # A volume with a filesystem: its job, then the volume.
    create_volume(driver, "tank", name="home", size="1G", filesystem="ext4")
    until(driver, lambda d: cells(d, "home")[4:5] == ["active"], "the new volume active")
    until(driver, lambda d: "completed (100%)" in job_text(d, "volume-create home"),
          "the volume's job, to its end")
    assert "· 1 GiB" in job_text(driver, "volume-create home")  # its Bytes: mkfs's size
    assert cells(driver, "home")[:6] == ["home", "1 GiB", "0 B", "—", "active", "thin"]

    # A snapshot, named in the browser's prompt; its origin shown.
    press(driver, "Snapshot home")
    prompt = driver.switch_to.alert
    prompt.send_keys("home.1")
    prompt.accept()
    until(driver, lambda d: cells(d, "home.1")[3:5] == ["home", "active"], "the snapshot")
    # Deactivated, then activated again.
    press(driver, "Deactivate home.1")
    until(driver, lambda d: cells(d, "home.1")[4:5] == ["inactive"], "it inactive")
    press(driver, "Activate home.1")
    until(driver, lambda d: cells(d, "home.1")[4:5] == ["active"], "it active again")
    shown = text(driver)
    assert "null" not in shown and "undefined" not in shown and "NaN" not in shown, shown
    screenshot(driver, "pool-with-volumes")
    accessible(driver, "a pool with volumes")

    # A change beside the page, by dmctl: shown at once, from dmd's signals
    # alone (the page polls nothing).
    made = subprocess.run([sys.executable, "-m", "dmd.cli.main", "--session", "vol-create",
                           "tank", "beside", "1G"], env=dmd_session.env, capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    until(driver, lambda d: cells(d, "beside")[4:5] == ["active"], "a volume made by dmctl")

    # A refused change: dmd's error, by name and message.
    create_volume(driver, "tank", name="home", size="1G")
    until(driver, lambda d: d.find_element(By.ID, "problem").is_displayed(), "the refusal")
    problem = driver.find_element(By.ID, "problem").text
    assert "AlreadyExists" in problem and "home" in problem, problem
    screenshot(driver, "refused")
    accessible(driver, "a refused change")
    driver.find_element(By.ID, "problem-close").click()

    # An encrypted volume: the passphrase typed in the page reaches dmd as a
    # descriptor (through dmctl), never as a string; locked, then unlocked
    # in the page's dialog, a wrong passphrase refused.
    form = create_volume(driver, "tank", name="safe", size="64M", passphrase=PASSPHRASE,
                         encrypt=True)
    assert form.find_element(By.NAME, "passphrase").get_attribute("value") == ""
    # Its job while it runs (cryptsetup's key derivation alone takes about
    # two seconds): shown running, with a progress bar below 100.
    until(driver, lambda d: job_text(d, "volume-create safe").startswith(
        "volume-create safe\nrunning"), "the job running")
    assert int(driver.execute_script(
        "const job = [...document.querySelectorAll('li.job')].find(j => "
        "j.innerText.startsWith('volume-create safe'));"
        "return job.querySelector('[role=progressbar]').getAttribute('aria-valuenow')")) < 100
    screenshot(driver, "job-running")
    until(driver, lambda d: cells(d, "safe")[4:6] == ["active", "thin, encrypted"],
          "the encrypted volume")
    press(driver, "Lock safe")
    until(driver, lambda d: cells(d, "safe")[5:6] == ["thin, encrypted, locked"], "it locked")
    for passphrase in ("wrong horse", PASSPHRASE):
        press(driver, "Unlock safe")
        until(driver, lambda d: d.find_element(By.ID, "unlock").is_displayed(), "the dialog")
        if passphrase != PASSPHRASE:
            screenshot(driver, "unlock")
            accessible(driver, "the unlock dialog")
        dialog = driver.find_element(By.ID, "unlock")
        fill(dialog, passphrase=passphrase)
        dialog.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        assert dialog.find_element(By.NAME, "passphrase").get_attribute("value") == ""
        if passphrase != PASSPHRASE:
            until(driver, lambda d: "WrongKey" in d.find_element(By.ID, "problem").text,
                  "the wrong passphrase refused")
            driver.find_element(By.ID, "problem-close").click()
    until(driver, lambda d: cells(d, "safe")[5:6] == ["thin, encrypted"], "it unlocked")
    assert PASSPHRASE not in dmd_session.log.read_text()

    # A delete, confirmed; its job names what it deleted.
    press(driver, "Delete beside")
    driver.switch_to.alert.accept()
    until(driver, lambda d: "beside" not in volume_names(d, "tank"), "the volume gone")
    assert set(volume_names(driver, "tank")) == {"home", "home.1", "safe"}
    until(driver, lambda d: job_text(d, "volume-delete beside").startswith(
        "volume-delete beside\ncompleted"), "the delete's job")
    screenshot(driver, "jobs")
    assert (SHOTS / "jobs.png").stat().st_size > 0


def test_a_page_opened_before_dmd_starts_shows_it_once_it_does(
        dmd_session: Any, cockpit: str, disks: list[str], browser_at: Any) -> None:
    dmd_session.stop()
    driver = browser_at(cockpit)
    until(driver, lambda d: "dmd" in d.find_element(By.ID, "connection").text
          and d.find_element(By.ID, "reload").is_displayed(), "that dmd is away")
    assert driver.find_element(By.ID, "app").get_attribute("aria-busy") is None
    dmd_session.start()
    until(driver, lambda d: "Connected to dmd." in text(d), "dmd, once it started")
    until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "input[name=disk]")) == 2,
          "the disks")


def test_grow_revert_stop_and_start_in_the_browser(browser: Any, dmd_session: Any,
                                                   disks: list[str]) -> None:
    """The page's other changes, each read back from what dmd then shows."""
    driver = browser
    dmctl = [sys.executable, "-m", "dmd.cli.main", "--session"]
    for args in (["pool-create", "tank", disks[0]], ["vol-create", "tank", "v", "64M"],
                 ["snapshot", "tank", "v", "v.1"]):
        made = subprocess.run([*dmctl, *args], env=dmd_session.env, capture_output=True,
                              text=True, timeout=60)
        assert made.returncode == 0, made.stderr
    until(driver, lambda d: cells(d, "v.1")[3:5] == ["v", "active"], "the snapshot")

    # Grow: the new size asked in a prompt.
    press(driver, "Grow v")
    prompt = driver.switch_to.alert
    prompt.send_keys("128M")
    prompt.accept()
    until(driver, lambda d: cells(d, "v")[1:2] == ["128 MiB"], "v grown")

    # Revert v to its snapshot, confirmed: v takes v.1's size (64 MiB) back.
    press(driver, "Revert v to v.1")
    driver.switch_to.alert.accept()
    until(driver, lambda d: cells(d, "v")[1:2] == ["64 MiB"], "v reverted")

    # Stop, then Start: the pool's state in words, its volumes back.
    press(driver, "Stop tank")
    until(driver, lambda d: texts(d, "article[data-pool='tank'] .mode") == ["stopped, inactive"],
          "the pool stopped")
    assert cells(driver, "v")[4:5] == ["inactive"] and cells(driver, "v")[6] == ""
    assert not driver.find_element(
        By.CSS_SELECTOR, "article[data-pool='tank'] form").is_displayed()
    press(driver, "Start tank")
    until(driver, lambda d: texts(d, "article[data-pool='tank'] .mode") == ["active, ok"],
          "the pool started")
    until(driver, lambda d: cells(d, "v")[4:5] == ["active"], "v back")
    accessible(driver, "a pool after a stop and a start")


def test_cancel_repair_and_destroy_in_the_browser(dmd_session: Any, cockpit: str,
                                                  disks: list[str], browser_at: Any,
                                                  tmp_path: Path) -> None:
    """A job cancelled from its Cancel button (its volume undone); a pool
    whose metadata was damaged while stopped: its Start failing with dmd's
    reason, then Repair and Start from the page; a Destroy, its disk free
    again."""
    # dmd again, with a mkfs.xfs first on its PATH that never ends (a real
    # one on the simulator's files takes a moment, too short to cancel).
    pid_file = tmp_path / "mkfs.pid"
    tools = tmp_path / "slow-mkfs"
    tools.mkdir()
    (tools / "mkfs.xfs").write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 120\n")
    (tools / "mkfs.xfs").chmod(0o755)
    dmd_session.stop()
    dmd_session.env["PATH"] = f"{tools}:{dmd_session.env['PATH']}"
    dmd_session.start()
    made = subprocess.run([sys.executable, "-m", "dmd.cli.main", "--session", "pool-create",
                           "tank", disks[0]], env=dmd_session.env, capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    driver = browser_at(cockpit)
    until(driver, lambda d: texts(d, "article[data-pool='tank'] .mode") == ["active, ok"],
          "the pool")

    # Cancel: offered while mkfs runs; the job ends cancelled, mkfs is
    # stopped and the volume is gone.
    create_volume(driver, "tank", name="slow", size="1G", filesystem="xfs")
    until(driver, lambda d: pid_file.exists() and pid_file.read_text().strip(), "mkfs running")
    until(driver, lambda d: button(d, "Cancel volume-create slow").is_displayed(),
          "the job's Cancel")
    screenshot(driver, "job-cancellable")
    press(driver, "Cancel volume-create slow")
    until(driver, lambda d: job_text(d, "volume-create slow").startswith(
        "volume-create slow\ncancelled"), "the job cancelled")
    until(driver, lambda d: "slow" not in volume_names(d, "tank"), "the volume undone")
    mkfs = int(pid_file.read_text())
    until(driver, lambda d: not Path(f"/proc/{mkfs}").exists(), "mkfs stopped")
    assert not driver.find_elements(By.CSS_SELECTOR, "button[aria-label^='Cancel ']")

    # Damaged while stopped: Start fails with dmd's reason, the pool's mode
    # says it, Repair mends it, Start brings it back.
    press(driver, "Stop tank")
    until(driver, lambda d: texts(d, "article[data-pool='tank'] .mode") == ["stopped, inactive"],
          "the pool stopped")
    SimDM(dmd_session.sim).damage_metadata(disks[0], 4 << 20, superblock=True)
    press(driver, "Start tank")
    until(driver, lambda d: d.find_element(By.ID, "problem").is_displayed(), "Start refused")
    problem = driver.find_element(By.ID, "problem").text
    assert "Corrupt" in problem and "damaged" in problem, problem
    driver.find_element(By.ID, "problem-close").click()
    until(driver, lambda d: texts(d, "article[data-pool='tank'] .mode") == ["stopped, damaged"],
          "the pool damaged")
    card = texts(driver, "article[data-pool='tank']")[0]
    assert "Changes refused:" in card and "thin_check" in card, card
    screenshot(driver, "damaged")
    accessible(driver, "a damaged pool")
    press(driver, "Repair tank")
    until(driver, lambda d: job_text(d, "pool-repair tank").startswith(
        "pool-repair tank\ncompleted"), "the repair's job, to its end")
    press(driver, "Start tank")
    until(driver, lambda d: texts(d, "article[data-pool='tank'] .mode") == ["active, ok"],
          "the pool started after its repair")

    # Destroy, confirmed: the pool gone, its disk free to pick again.
    press(driver, "Destroy tank")
    driver.switch_to.alert.accept()
    until(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, "article[data-pool='tank']"),
          "the pool destroyed")
    until(driver, lambda d: disk_box(d, disks[0]).get_attribute("disabled") is None,
          "its disk free again")
    assert driver.find_element(By.ID, "no-pools").is_displayed()
