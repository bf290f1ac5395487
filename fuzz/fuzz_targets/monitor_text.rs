//! The `udevadm monitor --kernel --property` reader (replay fixtures, user captures): any text
//! reads without panic, errors name a line of the text, and every event it reads prints back
//! with `Uevent::write_monitor` into text that reads as the same event.
#![no_main]

use autoattach::uevent::{MonitorText, Record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let lines = data.split(|&b| b == b'\n').count();
    for record in MonitorText::new(data) {
        match record {
            Err(e) => {
                assert!((1..=lines).contains(&e.line), "error line {} of a {lines}-line text", e.line);
                let _ = e.to_string();
            }
            Ok(Record::Directive(_, line)) => assert!((1..=lines).contains(&line)),
            Ok(Record::Event(event, line)) => {
                assert!((1..=lines).contains(&line));
                let mut text = Vec::new();
                event.write_monitor(&mut text).unwrap();
                let mut again = MonitorText::new(&text);
                let back = match again.next() {
                    Some(Ok(Record::Event(back, 1))) => back,
                    other => {
                        panic!("{:?} printed as {:?}, which reads as {other:?}", event, String::from_utf8_lossy(&text))
                    }
                };
                assert_eq!(back.vars(), event.vars());
                assert_eq!((back.action, back.devpath, back.subsystem), (event.action, event.devpath, event.subsystem));
                assert!(again.next().is_none(), "one event printed, more read back");
            }
        }
    }
});
