//! The part of an image config that says how to run it, and the rules (as
//! `docker run` applies them) for combining it with what the user asks for.

use oci_spec::image::ImageConfiguration;
use serde::{Deserialize, Serialize};

use super::error::ConfigError;

/// What the image's config says about running it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=VALUE` entries.
    pub env: Vec<String>,
    /// Empty when the image sets none.
    pub working_dir: String,
    /// `user`, `uid`, `user:group`, `uid:gid`...; empty when unset (root).
    pub user: String,
    pub stop_signal: Option<String>,
    pub architecture: String,
    pub os: String,
}

/// What the user asked for on top of the image (all optional).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Replaces the image's Entrypoint (and drops its Cmd). `Some(vec![])`
    /// clears the entrypoint, like `docker run --entrypoint ""`.
    pub entrypoint: Option<Vec<String>>,
    /// Arguments after the image name: replace the image's Cmd.
    pub args: Vec<String>,
    /// `NAME=VALUE` entries added to (or replacing) the image's.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// The process to start: argv, environment, cwd and user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    /// Absolute; `/` when nothing sets it.
    pub cwd: String,
    /// As the image or the user wrote it; empty means root. Resolve names
    /// against the rootfs with [`super::resolve_user`].
    pub user: String,
}

/// The PATH docker gives a container whose image sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl From<&ImageConfiguration> for ImageConfig {
    fn from(image: &ImageConfiguration) -> Self {
        let mut config = ImageConfig {
            architecture: image.architecture().to_string(),
            os: image.os().to_string(),
            ..ImageConfig::default()
        };
        if let Some(c) = image.config() {
            config.entrypoint = c.entrypoint().clone().unwrap_or_default();
            config.cmd = c.cmd().clone().unwrap_or_default();
            config.env = c.env().clone().unwrap_or_default();
            config.working_dir = c.working_dir().clone().unwrap_or_default();
            config.user = c.user().clone().unwrap_or_default();
            config.stop_signal = c.stop_signal().clone();
        }
        config
    }
}

impl ImageConfig {
    /// Combines the image's defaults with `overrides`, as `docker run` does:
    /// - argv is Entrypoint + Cmd; arguments given replace Cmd; an
    ///   entrypoint given replaces Entrypoint and drops the image's Cmd;
    /// - env is the image's, then the given entries (same name replaces),
    ///   plus a default PATH when neither sets one;
    /// - cwd is the given one, else WorkingDir, else `/`;
    /// - user is the given one, else User, else empty (root).
    pub fn process(&self, overrides: &Overrides) -> Result<ProcessSpec, ConfigError> {
        let (entrypoint, cmd) = match &overrides.entrypoint {
            Some(entrypoint) => (entrypoint.clone(), overrides.args.clone()),
            None if !overrides.args.is_empty() => (self.entrypoint.clone(), overrides.args.clone()),
            None => (self.entrypoint.clone(), self.cmd.clone()),
        };
        let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
        if args.is_empty() {
            return Err(ConfigError::NoCommand);
        }

        let mut env: Vec<String> = Vec::new();
        for entry in self.env.iter().chain(&overrides.env) {
            let (name, _) = entry
                .split_once('=')
                .ok_or_else(|| ConfigError::BadEnv(entry.clone()))?;
            if name.is_empty() {
                return Err(ConfigError::BadEnv(entry.clone()));
            }
            let prefix = format!("{name}=");
            match env.iter_mut().find(|e| e.starts_with(&prefix)) {
                Some(existing) => existing.clone_from(entry),
                None => env.push(entry.clone()),
            }
        }
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, DEFAULT_PATH.to_string());
        }

        let cwd = match &overrides.working_dir {
            Some(dir) => dir.clone(),
            None if !self.working_dir.is_empty() => self.working_dir.clone(),
            None => "/".to_string(),
        };
        if !cwd.starts_with('/') {
            return Err(ConfigError::RelativeWorkingDir(cwd));
        }

        let user = overrides.user.clone().unwrap_or_else(|| self.user.clone());
        Ok(ProcessSpec {
            args,
            env,
            cwd,
            user,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: strings(&["/docker-entrypoint.sh"]),
            cmd: strings(&["nginx", "-g", "daemon off;"]),
            env: strings(&["PATH=/usr/bin:/bin", "LANG=C.UTF-8"]),
            working_dir: "/srv".into(),
            user: "www:www".into(),
            ..ImageConfig::default()
        }
    }

    #[test]
    fn defaults_come_from_the_image() {
        let p = image().process(&Overrides::default()).unwrap();
        assert_eq!(
            p.args,
            strings(&["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"])
        );
        assert_eq!(p.env, strings(&["PATH=/usr/bin:/bin", "LANG=C.UTF-8"]));
        assert_eq!(p.cwd, "/srv");
        assert_eq!(p.user, "www:www");
    }

    #[test]
    fn args_replace_cmd_and_keep_entrypoint() {
        let o = Overrides {
            args: strings(&["sh"]),
            ..Overrides::default()
        };
        assert_eq!(
            image().process(&o).unwrap().args,
            strings(&["/docker-entrypoint.sh", "sh"])
        );
    }

    #[test]
    fn entrypoint_replaces_entrypoint_and_drops_cmd() {
        let o = Overrides {
            entrypoint: Some(strings(&["/bin/ls"])),
            ..Overrides::default()
        };
        assert_eq!(image().process(&o).unwrap().args, strings(&["/bin/ls"]));
        let o = Overrides {
            entrypoint: Some(strings(&["/bin/ls"])),
            args: strings(&["-l", "/"]),
            ..Overrides::default()
        };
        assert_eq!(
            image().process(&o).unwrap().args,
            strings(&["/bin/ls", "-l", "/"])
        );
        // An empty entrypoint clears it: the args are the whole command.
        let o = Overrides {
            entrypoint: Some(vec![]),
            args: strings(&["true"]),
            ..Overrides::default()
        };
        assert_eq!(image().process(&o).unwrap().args, strings(&["true"]));
    }

    #[test]
    fn no_command_is_an_error() {
        let empty = ImageConfig::default();
        assert_eq!(
            empty.process(&Overrides::default()),
            Err(ConfigError::NoCommand)
        );
        let o = Overrides {
            entrypoint: Some(vec![]),
            ..Overrides::default()
        };
        assert_eq!(image().process(&o), Err(ConfigError::NoCommand));
    }

    #[test]
    fn cmd_alone_is_the_command() {
        let config = ImageConfig {
            cmd: strings(&["/bin/sh"]),
            ..ImageConfig::default()
        };
        let p = config.process(&Overrides::default()).unwrap();
        assert_eq!(p.args, strings(&["/bin/sh"]));
        assert_eq!(p.cwd, "/");
        assert_eq!(p.user, "");
        assert_eq!(p.env, strings(&[DEFAULT_PATH]));
    }

    #[test]
    fn env_overrides_merge_by_name() {
        let o = Overrides {
            env: strings(&["LANG=en_US.UTF-8", "DEBUG=1", "EMPTY="]),
            ..Overrides::default()
        };
        let p = image().process(&o).unwrap();
        assert_eq!(
            p.env,
            strings(&[
                "PATH=/usr/bin:/bin",
                "LANG=en_US.UTF-8",
                "DEBUG=1",
                "EMPTY="
            ])
        );
        let bad = Overrides {
            env: strings(&["NOEQUALS"]),
            ..Overrides::default()
        };
        assert_eq!(
            image().process(&bad),
            Err(ConfigError::BadEnv("NOEQUALS".into()))
        );
    }

    #[test]
    fn cwd_and_user_overrides() {
        let o = Overrides {
            working_dir: Some("/tmp".into()),
            user: Some("1000:1000".into()),
            ..Overrides::default()
        };
        let p = image().process(&o).unwrap();
        assert_eq!(p.cwd, "/tmp");
        assert_eq!(p.user, "1000:1000");
        let o = Overrides {
            working_dir: Some("tmp".into()),
            ..Overrides::default()
        };
        assert_eq!(
            image().process(&o),
            Err(ConfigError::RelativeWorkingDir("tmp".into()))
        );
    }

    #[test]
    fn parses_oci_and_docker_configs() {
        let json = r#"{
            "architecture": "amd64", "os": "linux",
            "config": {"User": "1000", "Env": ["A=b"], "Entrypoint": null,
                       "Cmd": ["/bin/sh", "-c", "echo hi"], "WorkingDir": "/work",
                       "ExposedPorts": {"80/tcp": {}}, "StopSignal": "SIGQUIT",
                       "ArgsEscaped": true},
            "container_config": {"Hostname": "x"},
            "rootfs": {"type": "layers", "diff_ids": []}
        }"#;
        let parsed: ImageConfiguration = serde_json::from_str(json).unwrap();
        let config = ImageConfig::from(&parsed);
        assert_eq!(config.entrypoint, Vec::<String>::new());
        assert_eq!(config.cmd, strings(&["/bin/sh", "-c", "echo hi"]));
        assert_eq!(config.env, strings(&["A=b"]));
        assert_eq!(config.working_dir, "/work");
        assert_eq!(config.user, "1000");
        assert_eq!(config.stop_signal.as_deref(), Some("SIGQUIT"));
        assert_eq!(
            (config.os.as_str(), config.architecture.as_str()),
            ("linux", "amd64")
        );
    }
}
