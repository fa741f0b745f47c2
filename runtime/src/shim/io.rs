//! A process's stdio between containerd and the agent: containerd names a
//! FIFO (or a `file://` URI) per stream; one thread per stream copies the
//! agent's output into it, and containerd's stdin into the agent, until the
//! stream ends or the VM dies (which fails the pending agent calls).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use protocols::agent;
use protocols::agent_ttrpc::AgentServiceClient;

/// What containerd asked for, per stream; empty strings mean none.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    /// A TTY: stderr is merged into stdout by the pty.
    pub terminal: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("stdio {0:?}: only FIFOs, files and file:// URIs are supported")]
    Unsupported(String),
    #[error("opening stdio {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// Where an output stream goes: nowhere (drained all the same, so the
/// process never blocks on a full pipe) or an open FIFO or file.
fn open_output(uri: &str) -> Result<Option<File>, IoError> {
    if uri.is_empty() {
        return Ok(None);
    }
    let open_err = |source| IoError::Open {
        path: uri.to_string(),
        source,
    };
    if let Some(path) = uri.strip_prefix("file://") {
        if let Some(parent) = Path::new(path).parent() {
            std::fs::create_dir_all(parent).map_err(open_err)?;
        }
        return OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(Some)
            .map_err(open_err);
    }
    if uri.contains("://") {
        return Err(IoError::Unsupported(uri.to_string()));
    }
    // containerd has the read side open already; read+write keeps the open
    // from blocking if it has not.
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(uri)
        .map(Some)
        .map_err(open_err)
}

/// Checks the paths and starts copying the process's output (stdout, and
/// stderr unless it is a TTY). Returns the threads, which end at the
/// streams' ends.
pub fn start_output(
    client: &AgentServiceClient,
    container_id: &str,
    exec_id: &str,
    paths: &StdioPaths,
) -> Result<Vec<JoinHandle<()>>, IoError> {
    if !paths.stdin.is_empty() && paths.stdin.contains("://") {
        return Err(IoError::Unsupported(paths.stdin.clone()));
    }
    let stdout = open_output(&paths.stdout)?;
    let stderr = if paths.terminal {
        None
    } else {
        Some(open_output(&paths.stderr)?)
    };
    let request = agent::ReadStreamRequest {
        container_id: container_id.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    };
    let mut threads = vec![spawn_output(client.clone(), request.clone(), stdout, false)];
    if let Some(stderr) = stderr {
        threads.push(spawn_output(client.clone(), request, stderr, true));
    }
    Ok(threads)
}

fn spawn_output(
    client: AgentServiceClient,
    request: agent::ReadStreamRequest,
    mut out: Option<File>,
    stderr: bool,
) -> JoinHandle<()> {
    std::thread::spawn(move || loop {
        let chunk = protocols::read_output(&client, &request, stderr);
        match chunk {
            Ok(chunk) if !chunk.data.is_empty() => {
                if let Some(file) = out.as_mut() {
                    if let Err(e) = file.write_all(&chunk.data) {
                        tracing::debug!("{}: output dropped: {e}", request.container_id);
                        out = None;
                    }
                }
            }
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(
                    "{}/{}: output ended: {}",
                    request.container_id,
                    request.exec_id,
                    protocols::error_message(&e)
                );
                return;
            }
        }
    })
}

/// Copies containerd's stdin FIFO into the process until its EOF, then
/// closes the process's stdin. The thread waits for containerd to open
/// the FIFO's write side; [`release_input`] frees it if that never comes.
pub fn start_input(client: &AgentServiceClient, container_id: &str, exec_id: &str, path: &str) {
    if path.is_empty() {
        return;
    }
    let (client, path) = (client.clone(), PathBuf::from(path));
    let (container_id, exec_id) = (container_id.to_string(), exec_id.to_string());
    std::thread::spawn(move || {
        let mut input = match File::open(&path) {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!("{container_id}: opening stdin {}: {e}", path.display());
                return;
            }
        };
        let mut buffer = vec![0u8; 32 * 1024];
        loop {
            let n = match input.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let request = agent::WriteStreamRequest {
                container_id: container_id.clone(),
                exec_id: exec_id.clone(),
                data: buffer[..n].to_vec(),
                ..Default::default()
            };
            if client
                .write_stdin(protocols::unbounded_call(), &request)
                .is_err()
            {
                return;
            }
        }
        close_stdin(&client, &container_id, &exec_id);
    });
}

/// Tells the agent the process's stdin is at its end.
pub fn close_stdin(client: &AgentServiceClient, container_id: &str, exec_id: &str) {
    let request = agent::CloseStdinRequest {
        container_id: container_id.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    };
    let _ = client.close_stdin(protocols::quick_call(10), &request);
}

/// Frees an input thread still waiting for a writer on the FIFO at
/// `path`: opening the write side and closing it again gives it EOF.
pub fn release_input(path: &str) {
    let is_fifo = std::fs::metadata(path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    if is_fifo {
        let _ = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_uris_are_named() {
        let err = open_output("binary:///usr/bin/logger").unwrap_err();
        assert!(
            err.to_string().contains("binary:///usr/bin/logger"),
            "{err}"
        );
    }

    #[test]
    fn file_uris_are_appended_to() {
        let dir = std::env::temp_dir().join(format!("shim-io-{}", std::process::id()));
        let path = dir.join("sub/log");
        let uri = format!("file://{}", path.display());
        open_output(&uri).unwrap().unwrap().write_all(b"a").unwrap();
        open_output(&uri).unwrap().unwrap().write_all(b"b").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "ab");
        std::fs::remove_dir_all(dir).unwrap();
        assert!(open_output("").unwrap().is_none());
    }
}
