//! The place VM tests run (the KVM test host on PVM machines like these, the
//! machine itself on VMX/SVM hosts): output, exit statuses, stdin, signals,
//! timeouts and concurrency must all come through exactly.

use std::time::Duration;

use microvm_tests::{vm_host, ExitStatus, Kvm, VmHost};

fn host() -> &'static VmHost {
    vm_host(env!("CARGO_BIN_EXE_testhost"))
}

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn output_and_exit_code_come_back_separately() {
    let out = host()
        .run(
            &["sh", "-c", "echo out; echo err >&2; exit 7"],
            b"",
            TIMEOUT,
        )
        .unwrap();
    assert_eq!(out.status, ExitStatus::Code(7));
    assert_eq!(out.stdout_text(), "out\n");
    assert_eq!(out.stderr_text(), "err\n");
    assert!(!out.timed_out);
}

#[test]
fn death_by_signal_is_reported_as_such() {
    let out = host()
        .run(&["sh", "-c", "kill -TERM $$"], b"", TIMEOUT)
        .unwrap();
    assert_eq!(out.status, ExitStatus::Signal(libc::SIGTERM));
    assert_eq!(out.status.shell_code(), 143);
}

#[test]
fn stdin_round_trips_byte_identical() {
    // 4 MiB of xorshift noise: every byte value, no repeating pattern.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let input: Vec<u8> = (0..4 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let out = host().run(&["cat"], &input, TIMEOUT).unwrap();
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "cat returned different bytes");
}

#[test]
fn concurrent_commands_keep_their_own_output() {
    let threads: Vec<_> = (0..4)
        .map(|id| {
            std::thread::spawn(move || {
                let script = format!("for i in $(seq 1 200); do echo {id}-$i; done; exit {id}");
                host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap()
            })
        })
        .collect();
    for (id, thread) in threads.into_iter().enumerate() {
        let out = thread.join().unwrap();
        assert_eq!(out.status, ExitStatus::Code(id as i32));
        let expected: String = (1..=200).map(|i| format!("{id}-{i}\n")).collect();
        assert_eq!(out.stdout_text(), expected);
    }
}

#[test]
fn a_command_past_its_timeout_is_killed_with_its_children() {
    let out = host()
        .run(
            &["sh", "-c", "sleep 1000 & sleep 1000; echo not reached"],
            b"",
            Duration::from_secs(2),
        )
        .unwrap();
    assert!(out.timed_out);
    assert_eq!(out.status, ExitStatus::Signal(libc::SIGKILL));
    assert!(
        out.elapsed < Duration::from_secs(30),
        "took {:?}",
        out.elapsed
    );
    assert_eq!(out.stdout_text(), "");
}

#[test]
fn a_missing_program_is_a_clear_error() {
    let err = host()
        .run(&["/nonexistent/program"], b"", TIMEOUT)
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/program"), "{err}");
}

#[test]
fn vms_can_run_there() {
    let out = host()
        .run(
            &["sh", "-c", "test -c /dev/kvm && ls /sys/module"],
            b"",
            TIMEOUT,
        )
        .unwrap();
    assert_eq!(
        out.status,
        ExitStatus::Code(0),
        "no /dev/kvm: {}",
        out.stderr_text()
    );
    let modules = out.stdout_text();
    assert!(
        modules.lines().any(|m| m == "kvm_amd" || m == "kvm_intel"),
        "no hardware KVM module loaded: {modules}"
    );
    assert!(!modules.lines().any(|m| m == "kvm_pvm"), "still on PVM");
    if let VmHost::TestHost(_) = host() {
        assert_ne!(Kvm::detect(), Kvm::Hardware("kvm_amd".into()));
    }
}
