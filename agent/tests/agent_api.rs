//! The real `microvm-agent` binary on a Unix socket (not PID 1, so it mounts
//! nothing), driven through the generated ttrpc client as the runtime does.

// Test code: an unwrap is the assertion "this must not fail".
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use protocols::agent::*;
use protocols::agent_ttrpc::AgentServiceClient;

struct Agent {
    child: Child,
    dir: PathBuf,
    client: AgentServiceClient,
}

impl Agent {
    fn start() -> Agent {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "agent-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_microvm-agent"))
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("the agent did not listen on {}: {e}", socket.display()),
            }
        };
        let client = AgentServiceClient::new(protocols::client_from_stream(stream).unwrap());
        Agent { child, dir, client }
    }

    fn exec(&self, id: &str, argv: &[&str]) -> ttrpc::Result<ExecProcessResponse> {
        self.client.exec_process(
            ctx(),
            &ExecProcessRequest {
                exec_id: id.into(),
                argv: argv.iter().map(|s| s.to_string()).collect(),
                env: vec!["PATH=/usr/bin:/bin".into()],
                ..Default::default()
            },
        )
    }

    fn read_all(&self, id: &str, stderr: bool) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let request = ReadStreamRequest {
                exec_id: id.into(),
                ..Default::default()
            };
            let chunk = if stderr {
                self.client.read_stderr(ctx(), &request)
            } else {
                self.client.read_stdout(ctx(), &request)
            }
            .unwrap();
            if chunk.data.is_empty() {
                return all;
            }
            all.extend_from_slice(&chunk.data);
        }
    }

    fn wait(&self, id: &str) -> WaitProcessResponse {
        self.client
            .wait_process(
                ctx(),
                &WaitProcessRequest {
                    exec_id: id.into(),
                    ..Default::default()
                },
            )
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(30).as_nanos() as i64)
}

#[test]
fn check_answers_with_the_version() {
    let agent = Agent::start();
    let response = agent.client.check(ctx(), &CheckRequest::default()).unwrap();
    assert_eq!(response.version, env!("CARGO_PKG_VERSION"));
}

#[test]
fn output_and_exit_code_come_back() {
    let agent = Agent::start();
    agent
        .exec("p", &["sh", "-c", "echo out; echo err >&2; exit 3"])
        .unwrap();
    assert_eq!(agent.read_all("p", false), b"out\n");
    assert_eq!(agent.read_all("p", true), b"err\n");
    let exit = agent.wait("p");
    assert_eq!((exit.status, exit.signal), (3, 0));
    // Waiting again gives the same answer.
    assert_eq!(agent.wait("p").status, 3);
}

#[test]
fn death_by_signal_is_reported_as_the_signal() {
    let agent = Agent::start();
    agent.exec("k", &["sh", "-c", "kill -KILL $$"]).unwrap();
    assert_eq!(agent.wait("k").signal, 9);
    agent.exec("t", &["sleep", "100"]).unwrap();
    agent
        .client
        .signal_process(
            ctx(),
            &SignalProcessRequest {
                exec_id: "t".into(),
                signal: 15,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(agent.wait("t").signal, 15);
}

#[test]
fn a_missing_program_is_not_found_and_named() {
    let agent = Agent::start();
    let error = agent.exec("x", &["no-such-program-anywhere"]).unwrap_err();
    assert!(protocols::is_not_found(&error), "{error:?}");
    assert!(protocols::error_message(&error).contains("no-such-program-anywhere"));
    let error = agent.exec("y", &[]).unwrap_err();
    assert!(!protocols::is_not_found(&error));
}

#[test]
fn unknown_and_duplicate_exec_ids_are_refused() {
    let agent = Agent::start();
    let error = agent
        .client
        .wait_process(
            ctx(),
            &WaitProcessRequest {
                exec_id: "nobody".into(),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(protocols::is_not_found(&error));
    agent.exec("d", &["sleep", "100"]).unwrap();
    let error = agent.exec("d", &["true"]).unwrap_err();
    assert!(
        protocols::error_message(&error).contains("still running"),
        "{error:?}"
    );
    agent
        .client
        .signal_process(
            ctx(),
            &SignalProcessRequest {
                exec_id: "d".into(),
                signal: 9,
                ..Default::default()
            },
        )
        .unwrap();
    agent.wait("d");
}

#[test]
fn output_streams_while_the_process_runs() {
    let agent = Agent::start();
    let started = Instant::now();
    agent
        .exec("s", &["sh", "-c", "echo a; sleep 3; echo b"])
        .unwrap();
    let first = agent
        .client
        .read_stdout(
            ctx(),
            &ReadStreamRequest {
                exec_id: "s".into(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(first.data, b"a\n");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the first line waited for the end"
    );
    assert_eq!(agent.read_all("s", false), b"b\n");
    assert_eq!(agent.wait("s").status, 0);
}

#[test]
fn twenty_megabytes_of_output_arrive_complete() {
    let agent = Agent::start();
    agent
        .exec(
            "big",
            &["sh", "-c", "head -c 20000000 /dev/zero | tr '\\0' x"],
        )
        .unwrap();
    let out = agent.read_all("big", false);
    assert_eq!(out.len(), 20_000_000);
    assert!(out.iter().all(|&b| b == b'x'));
    assert_eq!(agent.wait("big").status, 0);
}

#[test]
fn stdin_round_trips_through_cat_while_output_is_read() {
    let agent = Agent::start();
    agent.exec("cat", &["cat"]).unwrap();
    let input: Vec<u8> = (0..10u32 << 20).map(|i| (i * 7 + i / 4099) as u8).collect();
    let writer = {
        let client = agent.client.clone();
        let input = input.clone();
        std::thread::spawn(move || {
            for chunk in input.chunks(64 * 1024) {
                client
                    .write_stdin(
                        ctx(),
                        &WriteStreamRequest {
                            exec_id: "cat".into(),
                            data: chunk.to_vec(),
                            ..Default::default()
                        },
                    )
                    .unwrap();
            }
            client
                .close_stdin(
                    ctx(),
                    &CloseStdinRequest {
                        exec_id: "cat".into(),
                        ..Default::default()
                    },
                )
                .unwrap();
        })
    };
    let out = agent.read_all("cat", false);
    writer.join().unwrap();
    assert_eq!(out.len(), input.len());
    assert!(out == input, "cat returned different bytes");
    assert_eq!(agent.wait("cat").status, 0);
}

#[test]
fn writing_to_an_exited_process_is_an_error_not_a_hang() {
    let agent = Agent::start();
    agent.exec("gone", &["true"]).unwrap();
    agent.wait("gone");
    let result = agent.client.write_stdin(
        ctx(),
        &WriteStreamRequest {
            exec_id: "gone".into(),
            data: vec![0u8; 1 << 20],
            ..Default::default()
        },
    );
    assert!(result.is_err());
}

#[test]
fn env_and_cwd_are_exactly_as_asked() {
    let agent = Agent::start();
    agent
        .client
        .exec_process(
            ctx(),
            &ExecProcessRequest {
                exec_id: "e".into(),
                argv: vec!["/bin/sh".into(), "-c".into(), "pwd; env | sort".into()],
                env: vec!["FOO=bar baz".into(), "PATH=/usr/bin:/bin".into()],
                cwd: "/tmp".into(),
                ..Default::default()
            },
        )
        .unwrap();
    let out = String::from_utf8(agent.read_all("e", false)).unwrap();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("/tmp"));
    let env: Vec<&str> = lines
        .filter(|l| !l.starts_with("PWD=") && !l.starts_with("SHLVL=") && !l.starts_with("_="))
        .collect();
    assert_eq!(env, vec!["FOO=bar baz", "PATH=/usr/bin:/bin"]);
    let error = agent
        .client
        .exec_process(
            ctx(),
            &ExecProcessRequest {
                exec_id: "bad-cwd".into(),
                argv: vec!["true".into()],
                cwd: "/no/such/dir".into(),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(protocols::error_message(&error).contains("/no/such/dir"));
}

#[test]
fn shutdown_ends_the_agent() {
    let mut agent = Agent::start();
    agent
        .client
        .shutdown(ctx(), &ShutdownRequest::default())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            assert!(status.success());
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not exit after Shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The network rpcs are wired and answer bad requests with INVALID_ARGUMENT
/// naming the rpc and the culprit. Only error paths: the agent runs in the
/// host's network namespace here, which must not change.
#[test]
fn network_rpcs_refuse_bad_requests_with_invalid_argument() {
    let agent = Agent::start();
    let invalid = |result: ttrpc::Error, needle: &str| match result {
        ttrpc::Error::RpcStatus(status) => {
            assert_eq!(status.code(), ttrpc::Code::INVALID_ARGUMENT, "{status:?}");
            assert!(
                status.message().contains(needle),
                "{:?} does not mention {needle:?}",
                status.message()
            );
        }
        other => panic!("expected a status, got {other:?}"),
    };

    let no_interface = agent
        .client
        .update_interface(ctx(), &UpdateInterfaceRequest::default())
        .unwrap_err();
    invalid(no_interface, "UpdateInterface: no interface given");

    let unknown_mac = UpdateInterfaceRequest {
        interface: Some(Interface {
            name: "eth0".into(),
            mac: "02:00:5E:DE:AD:01".into(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let error = agent
        .client
        .update_interface(ctx(), &unknown_mac)
        .unwrap_err();
    invalid(
        error,
        "UpdateInterface: no guest NIC has MAC 02:00:5e:de:ad:01",
    );

    let routes = UpdateRoutesRequest {
        routes: vec![Route {
            dest: "10.77.0.0/16".into(),
            device: "mvnosuch0".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let error = agent.client.update_routes(ctx(), &routes).unwrap_err();
    invalid(
        error,
        "UpdateRoutes: route 10.77.0.0/16 dev mvnosuch0: no guest link named \"mvnosuch0\"",
    );

    let neighbors = AddArpNeighborsRequest {
        neighbors: vec![ArpNeighbor {
            ip: Some(IpAddress {
                address: "10.0.0.999".into(),
                prefix_len: 32,
                ..Default::default()
            })
            .into(),
            device: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let error = agent
        .client
        .add_arp_neighbors(ctx(), &neighbors)
        .unwrap_err();
    invalid(
        error,
        "AddArpNeighbors: neighbour 10.0.0.999 dev eth0: bad address",
    );
}
