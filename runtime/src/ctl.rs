//! `microvm ctl`: drives the agent API of one VM from a script, one command
//! a line — several containers, exec, signals, pids, stats, pause/resume,
//! update, remove — for people working on the agent and for tests (as
//! Kata's agent-ctl). Each command prints its result; a failing command
//! prints `error: MESSAGE` and the script goes on.
//!
//! ```text
//! create ID [--tty] [-u UID[:GID]] -- ARGS...   container on the rootfs shared as ID/rootfs
//! start ID
//! exec ID EXEC_ID [--tty] -- ARGS...            runs to its end: output, then exit=N
//! wait ID                                        init's output, then exit=N oom=BOOL
//! kill ID SIGNAL [--all]
//! pids ID | stats ID | pause ID | resume ID | rm ID
//! update ID RESOURCES_JSON
//! resize ID EXEC_ID ROWS COLS
//! sleep SECONDS | echo TEXT...
//! ```

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use protocols::agent;
use protocols::agent_ttrpc::AgentServiceClient;

use crate::oci::{self, ContainerOptions};

fn rpc<T>(result: ttrpc::Result<T>) -> Result<T> {
    result.map_err(|e| anyhow::anyhow!(protocols::error_message(&e)))
}

/// Collected output of one process, filled by pump threads.
struct Collected {
    output: Arc<Mutex<Vec<u8>>>,
    pumps: Vec<JoinHandle<()>>,
}

fn collect(client: &AgentServiceClient, container_id: &str, exec_id: &str, tty: bool) -> Collected {
    let output = Arc::new(Mutex::new(Vec::new()));
    let streams: &[bool] = if tty { &[false] } else { &[false, true] };
    let pumps = streams
        .iter()
        .map(|&stderr| {
            let client = client.clone();
            let output = output.clone();
            let request = agent::ReadStreamRequest {
                container_id: container_id.to_string(),
                exec_id: exec_id.to_string(),
                ..Default::default()
            };
            thread::spawn(move || loop {
                let chunk = protocols::read_output(&client, &request, stderr);
                match chunk {
                    Ok(chunk) if !chunk.data.is_empty() => output
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .extend_from_slice(&chunk.data),
                    _ => return,
                }
            })
        })
        .collect();
    Collected { output, pumps }
}

impl Collected {
    fn finish(self) -> Vec<u8> {
        for pump in self.pumps {
            let _ = pump.join();
        }
        std::mem::take(&mut *self.output.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

pub struct Ctl {
    client: AgentServiceClient,
    inits: HashMap<String, (Collected, bool)>,
    specs: HashMap<String, oci_spec::runtime::Spec>,
}

fn parse_user(value: &str) -> Result<(u32, u32)> {
    let (uid, gid) = value.split_once(':').unwrap_or((value, value));
    Ok((
        uid.parse().context("-u takes UID[:GID]")?,
        gid.parse().context("-u takes UID[:GID]")?,
    ))
}

/// A process's `--tty`, `-u UID[:GID]` and args, as a command gives them.
type ProcessWords = (bool, Option<(u32, u32)>, Vec<String>);

/// Splits `--tty`, `-u` and the args after `--` off a command's words.
fn process_words(words: &[String]) -> Result<ProcessWords> {
    let mut tty = false;
    let mut user = None;
    let mut iter = words.iter();
    while let Some(word) = iter.next() {
        match word.as_str() {
            "--tty" | "-t" => tty = true,
            "-u" => user = Some(parse_user(iter.next().context("-u needs a value")?)?),
            "--" => return Ok((tty, user, iter.cloned().collect())),
            other => bail!("unexpected {other:?} (the command goes after --)"),
        }
    }
    bail!("no command (give it after --)")
}

impl Ctl {
    pub fn new(client: AgentServiceClient) -> Self {
        Self {
            client,
            inits: HashMap::new(),
            specs: HashMap::new(),
        }
    }

    /// Prepares the sandbox (mounts the share `tag`, if any).
    pub fn create_sandbox(&self, tag: &str) -> Result<()> {
        rpc(self.client.create_sandbox(
            protocols::unbounded_call(),
            &agent::CreateSandboxRequest {
                shared_fs_tag: tag.to_string(),
                ..Default::default()
            },
        ))?;
        Ok(())
    }

    /// Runs every command of `script`, printing results to `out`.
    pub fn run_script(&mut self, script: impl BufRead, out: &mut impl Write) -> Result<()> {
        for line in script.lines() {
            let line = line?;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words = shlex::split(line).with_context(|| format!("cannot split {line:?}"))?;
            if let Err(e) = self.command(&words, out) {
                writeln!(out, "error: {e:#}")?;
            }
            out.flush()?;
        }
        Ok(())
    }

    fn command(&mut self, words: &[String], out: &mut impl Write) -> Result<()> {
        let arg = |i: usize| {
            words
                .get(i)
                .cloned()
                .with_context(|| format!("{} needs more arguments", words[0]))
        };
        let id = || arg(1);
        match words[0].as_str() {
            "create" => {
                let id = id()?;
                let (tty, user, args) = process_words(&words[2..])?;
                let (uid, gid) = user.unwrap_or((0, 0));
                let options = ContainerOptions {
                    args,
                    terminal: tty,
                    uid,
                    gid,
                    hostname: id.clone(),
                    ..Default::default()
                };
                let spec = oci::container_spec(&options, "rootfs");
                let created = rpc(self.client.create_container(
                    protocols::unbounded_call(),
                    &agent::CreateContainerRequest {
                        container_id: id.clone(),
                        spec_json: serde_json::to_string(&spec)?,
                        bundle: id.clone(),
                        ..Default::default()
                    },
                ))?;
                let collected = collect(&self.client, &id, &id, tty);
                self.inits.insert(id.clone(), (collected, tty));
                self.specs.insert(id.clone(), spec);
                writeln!(out, "created {id} pid={}", created.pid)?;
            }
            "start" => {
                let id = id()?;
                rpc(self.client.start_container(
                    protocols::unbounded_call(),
                    &agent::StartContainerRequest {
                        container_id: id.clone(),
                        ..Default::default()
                    },
                ))?;
                writeln!(out, "started {id}")?;
            }
            "exec" => {
                let (id, exec_id) = (id()?, arg(2)?);
                let (tty, user, args) = process_words(&words[3..])?;
                let spec = self
                    .specs
                    .get(&id)
                    .with_context(|| format!("no container {id}"))?;
                let mut process = spec.process().clone().unwrap_or_default();
                process.set_args(Some(args));
                process.set_terminal(Some(tty));
                if let Some((uid, gid)) = user {
                    let mut u = process.user().clone();
                    u.set_uid(uid);
                    u.set_gid(gid);
                    process.set_user(u);
                }
                rpc(self.client.exec_in_container(
                    protocols::unbounded_call(),
                    &agent::ExecInContainerRequest {
                        container_id: id.clone(),
                        exec_id: exec_id.clone(),
                        process_json: serde_json::to_string(&process)?,
                        ..Default::default()
                    },
                ))?;
                let collected = collect(&self.client, &id, &exec_id, tty);
                let (code, oom) = self.wait(&id, &exec_id)?;
                out.write_all(&collected.finish())?;
                writeln!(out, "exit={code}{}", if oom { " oom=true" } else { "" })?;
            }
            "wait" => {
                let id = id()?;
                let (code, oom) = self.wait(&id, &id)?;
                if let Some((collected, _)) = self.inits.remove(&id) {
                    out.write_all(&collected.finish())?;
                }
                writeln!(out, "exit={code} oom={oom}")?;
            }
            "kill" => {
                let id = id()?;
                let signal: u32 = arg(2)?.parse().context("kill takes a signal number")?;
                rpc(self.client.signal_process(
                    protocols::unbounded_call(),
                    &agent::SignalProcessRequest {
                        container_id: id,
                        signal,
                        all: words.get(3).is_some_and(|w| w == "--all"),
                        ..Default::default()
                    },
                ))?;
            }
            "pids" => {
                let pids = rpc(self.client.list_pids(
                    protocols::unbounded_call(),
                    &agent::ListPidsRequest {
                        container_id: id()?,
                        ..Default::default()
                    },
                ))?;
                let list: Vec<String> = pids.pids.iter().map(u32::to_string).collect();
                writeln!(out, "pids={}", list.join(","))?;
            }
            "stats" => {
                let stats = rpc(self.client.stats_container(
                    protocols::unbounded_call(),
                    &agent::StatsContainerRequest {
                        container_id: id()?,
                        ..Default::default()
                    },
                ))?;
                let (cpu, memory, pids) = (stats.cpu, stats.memory, stats.pids);
                writeln!(
                    out,
                    "cpu.usage_usec={} memory.usage={} memory.limit={} pids.current={} pids.limit={}",
                    cpu.usage_usec, memory.usage, memory.limit, pids.current, pids.limit
                )?;
            }
            "pause" => {
                rpc(self.client.pause_container(
                    protocols::unbounded_call(),
                    &agent::PauseContainerRequest {
                        container_id: id()?,
                        ..Default::default()
                    },
                ))?;
                writeln!(out, "paused")?;
            }
            "resume" => {
                rpc(self.client.resume_container(
                    protocols::unbounded_call(),
                    &agent::ResumeContainerRequest {
                        container_id: id()?,
                        ..Default::default()
                    },
                ))?;
                writeln!(out, "resumed")?;
            }
            "update" => {
                rpc(self.client.update_container(
                    protocols::unbounded_call(),
                    &agent::UpdateContainerRequest {
                        container_id: id()?,
                        resources_json: arg(2)?,
                        ..Default::default()
                    },
                ))?;
                writeln!(out, "updated")?;
            }
            "resize" => {
                rpc(self.client.resize_tty(
                    protocols::unbounded_call(),
                    &agent::ResizeTtyRequest {
                        container_id: id()?,
                        exec_id: arg(2)?,
                        rows: arg(3)?.parse().context("rows")?,
                        cols: arg(4)?.parse().context("cols")?,
                        ..Default::default()
                    },
                ))?;
            }
            "rm" => {
                let id = id()?;
                rpc(self.client.remove_container(
                    protocols::unbounded_call(),
                    &agent::RemoveContainerRequest {
                        container_id: id.clone(),
                        ..Default::default()
                    },
                ))?;
                self.inits.remove(&id);
                self.specs.remove(&id);
                writeln!(out, "removed {id}")?;
            }
            "sleep" => thread::sleep(Duration::from_secs_f64(arg(1)?.parse().context("seconds")?)),
            "echo" => writeln!(out, "{}", words[1..].join(" "))?,
            other => bail!("unknown command {other:?}"),
        }
        Ok(())
    }

    fn wait(&self, id: &str, exec_id: &str) -> Result<(u32, bool)> {
        let wait = rpc(self.client.wait_process(
            protocols::unbounded_call(),
            &agent::WaitProcessRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                ..Default::default()
            },
        ))?;
        let code = if wait.signal != 0 {
            128 + wait.signal
        } else {
            wait.status as u32
        };
        Ok((code, wait.oom_killed))
    }

    /// Removes what is left and ends the agent (and with it the VM).
    /// Returns whether the agent answered (see [`crate::sandbox::Sandbox::guest_quiesced`]).
    pub fn shutdown(self) -> bool {
        let _ = self.client.destroy_sandbox(
            protocols::quick_call(10),
            &agent::DestroySandboxRequest::default(),
        );
        self.client
            .shutdown(protocols::quick_call(2), &agent::ShutdownRequest::default())
            .is_ok()
    }
}
