//! The cases captured from a real kernel under qemu (`tests/fixtures/qemu-*`, made by
//! `captures_under_qemu` in tests/qemu/capture.rs): replay gives the calls the live agent made,
//! from each of the three captures a case holds (`udevadm monitor --kernel`, `--kernel --udev`,
//! `--udev`), and every case carries what identity and a reader of the case need.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The three captures each case holds.
const CAPTURES: [&str; 3] = ["events", "events-mixed", "events-udev"];

/// udevd finishes events in parallel workers, so a `--udev` capture has different devices'
/// events in the order their rules finished, not the kernel's: from it, replay gives each
/// device's calls in order, and the devices in the order udev finished them.
fn same_calls(capture: &str, expected: &str, replayed: &str) -> bool {
    if capture != "events-udev" {
        return expected == replayed;
    }
    let by_device = |calls: &str| {
        let mut map: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for call in calls.lines() {
            let dev = call.split("+__+").nth(1).unwrap_or_default().to_owned();
            map.entry(dev).or_default().push(call.to_owned());
        }
        map
    };
    by_device(expected) == by_device(replayed)
}

fn captured_cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("qemu-")))
        .collect();
    cases.sort();
    assert!(cases.len() >= 9, "only {} qemu-* cases in {}", cases.len(), dir.display());
    cases
}

fn name(case: &Path) -> String {
    case.file_name().unwrap().to_string_lossy().into_owned()
}

fn replay(case: &Path, capture: &str) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_autoattach"))
        .env_remove("JOURNAL_STREAM")
        .arg("replay")
        .arg(case)
        .arg(case.join(capture))
        .output()
        .expect("run autoattach replay");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn captured_cases_replay_to_the_live_calls() {
    let mut failures = Vec::new();
    for case in captured_cases() {
        let name = name(&case);
        let expected = std::fs::read_to_string(case.join("expected")).expect("read expected");
        for capture in CAPTURES {
            let (code, calls, stderr) = replay(&case, capture);
            if code != Some(0) || !same_calls(capture, &expected, &calls) {
                failures.push(format!(
                    "{name} ({capture}): exit {code:?}\nexpected:\n{expected}replayed:\n{calls}stderr:\n{stderr}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// What identity needs of the USB device (descriptors, serial, ids, interfaces), and what a
/// reader needs to know of the case (its README: kernel, qemu, udev, steps).
#[test]
fn captured_cases_carry_identity_and_origin() {
    for case in captured_cases() {
        let name = name(&case);
        let read =
            |file: &str| std::fs::read_to_string(case.join(file)).unwrap_or_else(|e| panic!("{name}/{file}: {e}"));
        let recording = read("device.umockdev");
        let usb_devices: Vec<&str> =
            recording.split("\n\n").filter(|block| block.contains("\nE: DEVTYPE=usb_device\n")).collect();
        assert!(!usb_devices.is_empty(), "{name}: no usb_device in the recording");
        for device in usb_devices {
            for key in ["H: descriptors=", "A: idVendor=", "A: idProduct=", "A: serial=", "A: bDeviceClass="] {
                assert!(device.contains(key), "{name}: a usb_device lacks {key}:\n{device}");
            }
        }
        assert!(
            recording.contains("\nA: bInterfaceClass="),
            "{name}: the recording has no USB interface with bInterfaceClass"
        );
        for capture in CAPTURES {
            assert!(
                read(capture).starts_with("monitor will print the received events for:\n"),
                "{name}/{capture} is not udevadm monitor's output"
            );
        }
        let readme = read("README.md");
        for what in [
            "- kernel: Debian package linux-image-",
            "- qemu: QEMU emulator version",
            "- udev: Debian package udev",
            "QMP {",
        ] {
            assert!(readme.contains(what), "{name}/README.md does not say {what:?}");
        }
    }
}
