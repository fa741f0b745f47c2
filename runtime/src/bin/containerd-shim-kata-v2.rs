//! `containerd-shim-kata-v2`: containerd's runtime `io.containerd.kata.v2`
//! (see `runtime/src/shim/`). containerd runs it with `start` (print the
//! pod shim's address), `delete` (clean up after a dead shim), or as the
//! long-lived shim serving the task API.

use std::io::Write;

use runtime::shim::{serve, service, RUNTIME_ID};

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let flags = match containerd_shim::parse(args.get(1..).unwrap_or_default()) {
        Ok(flags) => flags,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: {}", protocols::error_chain(&e));
            std::process::exit(2);
        }
    };
    match flags.action.as_str() {
        "start" => match service::start_for_containerd_1(&flags) {
            Ok(address) => {
                let mut stdout = std::io::stdout();
                let _ = stdout.write_all(address.as_bytes());
                let _ = stdout.flush();
            }
            Err(e) => {
                eprintln!("{RUNTIME_ID}: start: {e}");
                std::process::exit(1);
            }
        },
        // `delete`, `-info` and `-version` as the shim library does them.
        "delete" | "" if flags.socket.is_empty() => {
            let config = containerd_shim::Config {
                no_reaper: true,
                no_sub_reaper: true,
                ..Default::default()
            };
            containerd_shim::run::<service::KataShim>(RUNTIME_ID, Some(config));
        }
        _ => {
            if serve::serve(&flags).is_err() {
                std::process::exit(1);
            }
        }
    }
}
