//! containerd's configuration for runtime `kata`: the stanza, and the edit
//! `microvm install --containerd-config FILE` makes.
//!
//! containerd 1.6 has a built-in runtime table (`runc` only); a
//! configuration that declares any runtime replaces it whole. So adding
//! `kata` to a file that declares none (Debian's stock file) would leave
//! CRI without its default runtime `runc`, and CRI would refuse to load
//! ("no corresponding runtime configured in containerd.runtimes for
//! containerd default_runtime_name"). The edit therefore adds `runc` too
//! when the file lacks it, as Kata's documentation tells users to.
//!
//! The file is edited by appending tables to it (the user's text stays as
//! it was, comments included); the result is parsed again and checked
//! before it replaces the file (atomically, its mode kept, the previous
//! text kept beside it as `FILE.microvm.bak`). A file it cannot edit that
//! way — not version 2, not TOML, `kata` declared as another runtime — is
//! refused with the reason, and left alone.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use toml::Value;

use crate::shim::RUNTIME_ID;

/// containerd's CRI plugin, whose runtime table CRI and ctr both use.
const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";
/// The runtime containerd's CRI runs pods with unless told otherwise.
const DEFAULT_RUNTIME: &str = "runc";
const RUNC_RUNTIME_TYPE: &str = "io.containerd.runc.v2";

/// The comment that heads `deploy/containerd-kata.toml`.
pub const HEADER: &str = "\
# containerd 1.6 (configuration version 2): runtime `kata` for CRI (RuntimeClass
# handler `kata`) and ctr (`ctr run --runtime io.containerd.kata.v2`). Add it
# to /etc/containerd/config.toml (`microvm install --containerd-config FILE`
# does) and restart containerd; containerd-shim-kata-v2 must be on containerd's
# PATH. Declaring any runtime replaces containerd's built-in runtime table, so
# `runc` (CRI's default runtime) is declared too: leave it out only if the file
# declares it already.
";

/// Why a containerd configuration was not edited.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdConfigError {
    #[error("containerd configuration {path}: {why}; it was not changed: add the kata runtime by hand (`microvm install` without --containerd-config prints it)")]
    Refused { path: PathBuf, why: String },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What [`add_kata`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Edit {
    /// The file declares runtime `kata` already (of our runtime type).
    Unchanged,
    /// The tables were added; the previous text is at `backup` (none when
    /// there was no file).
    Updated {
        added_runc: bool,
        backup: Option<PathBuf>,
    },
}

/// The `kata` runtime's tables, naming the configuration file `config_file`.
pub fn kata_stanza(config_file: &Path) -> String {
    format!(
        r#"[plugins."{CRI_PLUGIN}".containerd.runtimes.kata]
  runtime_type = "{RUNTIME_ID}"
  # Privileged pods get the guest's devices, not the host's.
  privileged_without_host_devices = true
[plugins."{CRI_PLUGIN}".containerd.runtimes.kata.options]
  ConfigPath = "{}"
"#,
        config_file.display()
    )
}

/// The `runc` runtime's table, as containerd's built-in one.
fn runc_stanza() -> String {
    format!(
        r#"[plugins."{CRI_PLUGIN}".containerd.runtimes.runc]
  runtime_type = "{RUNC_RUNTIME_TYPE}"
"#
    )
}

/// Everything a version 2 file without runtimes needs: `runc` and `kata`.
pub fn full_stanza(config_file: &Path) -> String {
    format!("{}{}", runc_stanza(), kata_stanza(config_file))
}

/// Adds runtime `kata` (and `runc` if missing) to containerd's
/// configuration at `path` (a missing file is a new version 2 file).
pub fn add_kata(path: &Path, config_file: &Path) -> Result<Edit, ContainerdConfigError> {
    let io_error = |what, source| ContainerdConfigError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let current = match fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_error("reading", e)),
    };
    let text = current.as_deref().unwrap_or("version = 2\n");
    let edited = with_kata(text, config_file).map_err(|why| ContainerdConfigError::Refused {
        path: path.to_path_buf(),
        why,
    })?;
    let Some((edited, added_runc)) = edited else {
        return Ok(Edit::Unchanged);
    };
    let backup = match &current {
        Some(text) => {
            let backup = backup_path(path);
            write_atomically(&backup, text.as_bytes(), path)
                .map_err(|e| io_error("keeping a copy of", e))?;
            Some(backup)
        }
        None => None,
    };
    write_atomically(path, edited.as_bytes(), path).map_err(|e| io_error("writing", e))?;
    Ok(Edit::Updated { added_runc, backup })
}

/// Where [`add_kata`] keeps the text it replaced.
pub fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".microvm.bak");
    path.with_file_name(name)
}

/// `text` with runtime `kata` (and `runc` when missing) added, and whether
/// runc was; None when it has `kata` already; Err with the reason when it
/// cannot be edited safely.
pub fn with_kata(text: &str, config_file: &Path) -> Result<Option<(String, bool)>, String> {
    let parsed: Value = toml::from_str(text).map_err(|e| format!("not valid TOML: {e}"))?;
    match parsed.get("version") {
        Some(Value::Integer(2)) => {}
        None => {
            return Err(
                "it has no `version = 2`, so containerd reads it as version 1, \
                 whose runtime tables microvm does not edit"
                    .into(),
            )
        }
        Some(version) => {
            return Err(format!(
                "it is version {version}; microvm edits version 2 files (containerd 1.6 and 1.7)"
            ))
        }
    }
    let runtimes = runtimes(&parsed)?;
    if let Some(kata) = runtimes.and_then(|r| r.get("kata")) {
        let kind = kata.get("runtime_type").and_then(Value::as_str);
        if kind == Some(RUNTIME_ID) {
            return Ok(None);
        }
        return Err(format!(
            "it declares runtime kata already, of runtime_type {}; it is not replaced",
            kind.unwrap_or("(none)")
        ));
    }
    let default = default_runtime(&parsed)?;
    let has_default = runtimes.is_some_and(|r| r.contains_key(&default));
    if !has_default && default != DEFAULT_RUNTIME {
        return Err(format!(
            "its default_runtime_name is {default:?}, which it does not declare"
        ));
    }
    let added_runc = !has_default;
    let mut edited = text.trim_end().to_string();
    edited.push_str("\n\n# Added by `microvm install`.\n");
    if added_runc {
        edited.push_str(
            "# containerd's built-in runtime table goes once any runtime is declared: runc is \
             declared as it was.\n",
        );
        edited.push_str(&runc_stanza());
    }
    edited.push_str(&kata_stanza(config_file));
    check(&edited, &default)?;
    Ok(Some((edited, added_runc)))
}

/// The CRI plugin's runtime table, if the file has one.
fn runtimes(config: &Value) -> Result<Option<&toml::Table>, String> {
    let Some(containerd) = cri_containerd(config) else {
        return Ok(None);
    };
    match containerd.get("runtimes") {
        None => Ok(None),
        Some(Value::Table(table)) => Ok(Some(table)),
        Some(_) => Err("its containerd.runtimes is not a table".into()),
    }
}

fn cri_containerd(config: &Value) -> Option<&Value> {
    config.get("plugins")?.get(CRI_PLUGIN)?.get("containerd")
}

/// The runtime CRI uses when a pod names none.
fn default_runtime(config: &Value) -> Result<String, String> {
    match cri_containerd(config).and_then(|c| c.get("default_runtime_name")) {
        None => Ok(DEFAULT_RUNTIME.into()),
        Some(Value::String(name)) => Ok(name.clone()),
        Some(other) => Err(format!("its default_runtime_name is not a string: {other}")),
    }
}

/// The edited text must still parse, with `kata` of our type and the
/// default runtime declared (appending may clash with how the file wrote
/// its tables, e.g. as inline tables).
fn check(edited: &str, default: &str) -> Result<(), String> {
    let parsed: Value = toml::from_str(edited)
        .map_err(|e| format!("its tables cannot be added to by appending ({e})"))?;
    let runtimes = runtimes(&parsed)?.ok_or("the runtimes did not land where expected")?;
    let kata_type = runtimes
        .get("kata")
        .and_then(|k| k.get("runtime_type"))
        .and_then(Value::as_str);
    if kata_type != Some(RUNTIME_ID) || !runtimes.contains_key(default) {
        return Err("the runtimes did not land where expected".into());
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file renamed over it, with
/// the mode of `mode_of` when that exists (0644 otherwise).
fn write_atomically(path: &Path, bytes: &[u8], mode_of: &Path) -> io::Result<()> {
    let mode = fs::metadata(mode_of)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".microvm-tmp");
    let temporary = path.with_file_name(name);
    let written = (|| {
        let mut file = fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&temporary, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's /etc/containerd/config.toml (containerd 1.6.20).
    const DEBIAN: &str = r#"version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"#;

    fn config_file() -> &'static Path {
        Path::new("/etc/microvm/configuration.toml")
    }

    fn runtime_types(text: &str) -> Vec<(String, String)> {
        let parsed: Value = toml::from_str(text).unwrap();
        runtimes(&parsed)
            .unwrap()
            .unwrap()
            .iter()
            .map(|(name, r)| {
                (
                    name.clone(),
                    r["runtime_type"].as_str().unwrap().to_string(),
                )
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    #[test]
    fn debians_file_gets_runc_and_kata_and_keeps_its_text() {
        let (edited, added_runc) = with_kata(DEBIAN, config_file()).unwrap().unwrap();
        assert!(added_runc);
        assert!(edited.starts_with(DEBIAN.trim_end()), "{edited}");
        assert_eq!(
            runtime_types(&edited),
            vec![
                ("kata".to_string(), RUNTIME_ID.to_string()),
                ("runc".to_string(), RUNC_RUNTIME_TYPE.to_string()),
            ]
        );
        let parsed: Value = toml::from_str(&edited).unwrap();
        assert_eq!(
            parsed["plugins"][CRI_PLUGIN]["cni"]["conf_dir"].as_str(),
            Some("/etc/cni/net.d")
        );
        // Idempotent: a second edit changes nothing.
        assert_eq!(with_kata(&edited, config_file()).unwrap(), None);
    }

    #[test]
    fn a_declared_runc_is_kept_as_it_is() {
        let text = format!(
            "{DEBIAN}\n[plugins.\"{CRI_PLUGIN}\".containerd.runtimes.runc]\n  runtime_type = \"{RUNC_RUNTIME_TYPE}\"\n  [plugins.\"{CRI_PLUGIN}\".containerd.runtimes.runc.options]\n    SystemdCgroup = true\n"
        );
        let (edited, added_runc) = with_kata(&text, config_file()).unwrap().unwrap();
        assert!(!added_runc);
        assert_eq!(edited.matches("runtimes.runc]").count(), 1, "{edited}");
        assert!(edited.contains("SystemdCgroup = true"));
    }

    #[test]
    fn files_it_cannot_edit_safely_are_refused_with_the_reason() {
        let cases = [
            ("[plugins]\n", "version 1"),
            ("version = 3\n", "version 3"),
            ("version = 2\n[plugins\n", "not valid TOML"),
            (
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata]\nruntime_type = \"io.containerd.runc.v2\"\n",
                "declares runtime kata already",
            ),
            (
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\ndefault_runtime_name = \"crun\"\n",
                "\"crun\", which it does not declare",
            ),
            (
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nruntimes = { runc = { runtime_type = \"io.containerd.runc.v2\" } }\n",
                "cannot be added to by appending",
            ),
        ];
        for (text, why) in cases {
            let err = with_kata(text, config_file()).unwrap_err();
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_file_is_edited_atomically_with_a_backup_and_once() {
        let dir =
            std::env::temp_dir().join(format!("microvm-containerd-cfg-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        fs::write(&path, DEBIAN).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let edit = add_kata(&path, config_file()).unwrap();
        assert_eq!(
            edit,
            Edit::Updated {
                added_runc: true,
                backup: Some(dir.join("config.toml.microvm.bak")),
            }
        );
        assert_eq!(fs::read_to_string(backup_path(&path)).unwrap(), DEBIAN);
        let edited = fs::read_to_string(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(add_kata(&path, config_file()).unwrap(), Edit::Unchanged);
        assert_eq!(fs::read_to_string(&path).unwrap(), edited);

        fs::write(&path, "version = 3\n").unwrap();
        let err = add_kata(&path, config_file()).unwrap_err();
        assert!(err.to_string().contains("was not changed"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "version = 3\n");

        let new = dir.join("new.toml");
        assert_eq!(
            add_kata(&new, config_file()).unwrap(),
            Edit::Updated {
                added_runc: true,
                backup: None
            }
        );
        assert!(fs::read_to_string(&new)
            .unwrap()
            .starts_with("version = 2\n"));
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "no temporary file is left: {names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
