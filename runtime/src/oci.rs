//! The OCI runtime spec `microvm run` gives its container: runc's defaults
//! (`runc spec`: pid/ipc/uts/mount namespaces, the usual mounts, masked and
//! read-only paths, a small capability set) with the user's command, env,
//! working directory, user, terminal and read-only choice applied. The
//! network is the VM's own.

use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// What the user asked for.
#[derive(Debug, Clone, Default)]
pub struct ContainerOptions {
    pub args: Vec<String>,
    /// `KEY=VALUE`, applied over the defaults (PATH, TERM, HOME).
    pub env: Vec<String>,
    /// "/" when None.
    pub cwd: Option<String>,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub terminal: bool,
    pub read_only: bool,
    pub hostname: String,
}

/// Sets `KEY=VALUE` in `env`, replacing an earlier KEY.
pub fn set_env(env: &mut Vec<String>, entry: &str) {
    let key = entry.split_once('=').map_or(entry, |(k, _)| k);
    env.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != key);
    env.push(entry.to_string());
}

/// The spec for a container whose rootfs is `rootfs` (relative to the bundle).
pub fn container_spec(options: &ContainerOptions, rootfs: &str) -> Spec {
    let mut spec = Spec::default();
    spec.set_hostname(Some(options.hostname.clone()));

    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs.into());
    root.set_readonly(Some(options.read_only));
    spec.set_root(Some(root));

    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(options.args.clone()));
    let mut env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        "HOME=/root".to_string(),
    ];
    if options.terminal {
        env.push("TERM=xterm".to_string());
    }
    for entry in &options.env {
        set_env(&mut env, entry);
    }
    process.set_env(Some(env));
    process.set_cwd(options.cwd.clone().unwrap_or_else(|| "/".into()).into());
    process.set_terminal(Some(options.terminal));
    let mut user = process.user().clone();
    user.set_uid(options.uid);
    user.set_gid(options.gid);
    user.set_additional_gids(
        (!options.additional_gids.is_empty()).then(|| options.additional_gids.clone()),
    );
    process.set_user(user);
    process.set_no_new_privileges(Some(true));
    spec.set_process(Some(process));

    if let Some(mut linux) = spec.linux().clone() {
        if let Some(namespaces) = linux.namespaces().clone() {
            linux.set_namespaces(Some(
                namespaces
                    .into_iter()
                    .filter(|ns| ns.typ() != LinuxNamespaceType::Network)
                    .collect(),
            ));
        }
        spec.set_linux(Some(linux));
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_choices_land_in_the_spec() {
        let spec = container_spec(
            &ContainerOptions {
                args: vec!["id".into()],
                env: vec!["PATH=/bin".into(), "A=1".into()],
                cwd: Some("/tmp".into()),
                uid: 1000,
                gid: 100,
                terminal: true,
                read_only: true,
                hostname: "box".into(),
                ..Default::default()
            },
            "rootfs",
        );
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.args().as_deref(), Some(&["id".to_string()][..]));
        let env = process.env().clone().unwrap();
        assert!(env.contains(&"PATH=/bin".to_string()));
        assert!(env.contains(&"A=1".to_string()));
        assert_eq!(env.iter().filter(|e| e.starts_with("PATH=")).count(), 1);
        assert_eq!(process.user().uid(), 1000);
        assert_eq!(process.terminal(), Some(true));
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        assert_eq!(spec.hostname().as_deref(), Some("box"));
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert!(namespaces
            .iter()
            .all(|ns| ns.typ() != LinuxNamespaceType::Network));
        assert!(namespaces
            .iter()
            .any(|ns| ns.typ() == LinuxNamespaceType::Pid));
    }
}
