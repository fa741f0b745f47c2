//! The CRI pod and container configurations the way kubelet fills them,
//! built from command-line options.

use anyhow::{bail, Result};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, DnsConfig, ImageSpec, KeyValue, LinuxContainerConfig,
    LinuxContainerResources, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, Mount, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata,
};

use crate::args::Args;

/// The pod options, shared by `runp` and `create` (CreateContainer carries
/// the pod's configuration again; containerd takes the log directory from
/// it):
///
/// `--pod-name N` (required), `--pod-namespace NS` (default `default`),
/// `--pod-uid U` (default `<name>-uid`), `--attempt N`, `--log-dir D`,
/// `--cgroup-parent P`, `--hostname H`, `--pod-network` (a network namespace
/// of its own, set up by CNI; the default is the node's network, which needs
/// no CNI configuration), `--dns-server IP`, `--dns-search DOMAIN`,
/// `--dns-option OPT` (each repeatable: the pod's `dns_config`, from which
/// containerd writes its `resolv.conf`; none: the node's), `--pod-label K=V`,
/// `--pod-annotation K=V`, `--pod-memory BYTES` and `--pod-cpu-quota N` with
/// `--pod-cpu-period N` (the pod's `linux.resources`: the sum of its
/// containers' limits, which kubelet gives VM runtimes), `--pod-privileged`
/// (the pod may hold privileged containers).
pub fn pod_config(args: &mut Args) -> Result<PodSandboxConfig> {
    let Some(name) = args.value("pod-name") else {
        bail!("--pod-name is required");
    };
    let pod_network = args.switch("pod-network");
    // The default; accepted for clarity.
    let host_network = args.switch("host-network");
    if pod_network && host_network {
        bail!("--pod-network and --host-network exclude each other");
    }
    let (servers, searches, options) = (
        args.values("dns-server"),
        args.values("dns-search"),
        args.values("dns-option"),
    );
    let dns_config = (!servers.is_empty() || !searches.is_empty() || !options.is_empty())
        .then_some(DnsConfig {
            servers,
            searches,
            options,
        });
    let namespace_options = NamespaceOption {
        network: if pod_network {
            NamespaceMode::Pod
        } else {
            NamespaceMode::Node
        } as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    };
    let resources = LinuxContainerResources {
        memory_limit_in_bytes: args.number("pod-memory", 0)?,
        cpu_quota: args.number("pod-cpu-quota", 0)?,
        cpu_period: args.number("pod-cpu-period", 0)?,
        ..Default::default()
    };
    let resources = (resources != LinuxContainerResources::default()).then_some(resources);
    Ok(PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            uid: args
                .value("pod-uid")
                .unwrap_or_else(|| format!("{name}-uid")),
            namespace: args
                .value("pod-namespace")
                .unwrap_or_else(|| "default".into()),
            attempt: args.number("attempt", 0)?,
            name,
        }),
        hostname: args.value("hostname").unwrap_or_default(),
        dns_config,
        log_directory: args.value("log-dir").unwrap_or_default(),
        labels: args.pairs("pod-label")?.into_iter().collect(),
        annotations: args.pairs("pod-annotation")?.into_iter().collect(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: args.value("cgroup-parent").unwrap_or_default(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options),
                privileged: args.switch("pod-privileged"),
                ..Default::default()
            }),
            resources,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A container's configuration: `--name N` and `--image I` (required), the
/// command line after `--` (replacing the image's entrypoint and command;
/// none keeps the image's), `--arg A` (arguments after the image's
/// entrypoint instead), `--env K=V`, `--workdir D`, `--label K=V`,
/// `--annotation K=V`, `--log-path P` (relative to the pod's log directory;
/// default `<name>_0.log`), `--tty`, `--stdin`, `--privileged`,
/// `--memory BYTES`, `--cpu-quota N` with `--cpu-period N`,
/// `--mount HOST:CTR[:ro]` (repeatable: a bind mount of `HOST`, read-only
/// with `:ro`).
pub fn container_config(args: &mut Args) -> Result<ContainerConfig> {
    let (Some(name), Some(image)) = (args.value("name"), args.value("image")) else {
        bail!("--name and --image are required");
    };
    let resources = LinuxContainerResources {
        memory_limit_in_bytes: args.number("memory", 0)?,
        cpu_quota: args.number("cpu-quota", 0)?,
        cpu_period: args.number("cpu-period", 0)?,
        ..Default::default()
    };
    let privileged = args.switch("privileged");
    let mounts = args
        .values("mount")
        .iter()
        .map(|m| parse_mount(m))
        .collect::<Result<Vec<_>>>()?;
    Ok(ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.clone(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image,
            ..Default::default()
        }),
        command: std::mem::take(&mut args.command),
        args: args.values("arg"),
        working_dir: args.value("workdir").unwrap_or_default(),
        envs: args
            .pairs("env")?
            .into_iter()
            .map(|(key, value)| KeyValue { key, value })
            .collect(),
        mounts,
        labels: args.pairs("label")?.into_iter().collect(),
        annotations: args.pairs("annotation")?.into_iter().collect(),
        log_path: args
            .value("log-path")
            .unwrap_or_else(|| format!("{name}_0.log")),
        tty: args.switch("tty"),
        stdin: args.switch("stdin"),
        linux: Some(LinuxContainerConfig {
            resources: Some(resources),
            security_context: Some(LinuxContainerSecurityContext {
                privileged,
                ..Default::default()
            }),
        }),
        ..Default::default()
    })
}

/// `HOST:CTR` or `HOST:CTR:ro` as a CRI mount (private propagation).
fn parse_mount(text: &str) -> Result<Mount> {
    let (host_path, container_path, readonly) = match text.split(':').collect::<Vec<_>>()[..] {
        [host, ctr] => (host, ctr, false),
        [host, ctr, "ro"] => (host, ctr, true),
        [host, ctr, "rw"] => (host, ctr, false),
        _ => bail!("--mount {text:?}: expected HOST:CTR[:ro]"),
    };
    if !host_path.starts_with('/') || !container_path.starts_with('/') {
        bail!("--mount {text:?}: both paths must be absolute");
    }
    Ok(Mount {
        host_path: host_path.into(),
        container_path: container_path.into(),
        readonly,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Args {
        let words: Vec<String> = s.split_whitespace().map(String::from).collect();
        Args::parse(&words).unwrap()
    }

    #[test]
    fn a_pod_defaults_to_the_node_network() {
        let mut a = args("--pod-name p --log-dir /l --cgroup-parent /x --pod-label a=b");
        let pod = pod_config(&mut a).unwrap();
        a.finish().unwrap();
        let meta = pod.metadata.unwrap();
        assert_eq!(
            (
                meta.name.as_str(),
                meta.uid.as_str(),
                meta.namespace.as_str()
            ),
            ("p", "p-uid", "default")
        );
        assert_eq!(pod.log_directory, "/l");
        assert_eq!(pod.labels["a"], "b");
        let linux = pod.linux.unwrap();
        assert_eq!(linux.cgroup_parent, "/x");
        let ns = linux.security_context.unwrap().namespace_options.unwrap();
        assert_eq!(ns.network, NamespaceMode::Node as i32);
    }

    #[test]
    fn dns_options_make_the_dns_config() {
        let mut a = args(
            "--pod-name p --hostname h1 --dns-server 10.0.0.53 --dns-server 10.0.0.54 \
             --dns-search example.test --dns-option ndots:2",
        );
        let pod = pod_config(&mut a).unwrap();
        a.finish().unwrap();
        assert_eq!(pod.hostname, "h1");
        let dns = pod.dns_config.unwrap();
        assert_eq!(dns.servers, vec!["10.0.0.53", "10.0.0.54"]);
        assert_eq!(dns.searches, vec!["example.test"]);
        assert_eq!(dns.options, vec!["ndots:2"]);
        let mut a = args("--pod-name p");
        assert!(pod_config(&mut a).unwrap().dns_config.is_none());
    }

    #[test]
    fn mounts_are_host_colon_container_with_an_optional_ro() {
        let mut a = args("--name c --image i --mount /a:/b --mount /c:/d:ro");
        let c = container_config(&mut a).unwrap();
        a.finish().unwrap();
        let got: Vec<_> = c
            .mounts
            .iter()
            .map(|m| (m.host_path.as_str(), m.container_path.as_str(), m.readonly))
            .collect();
        assert_eq!(got, vec![("/a", "/b", false), ("/c", "/d", true)]);
        for bad in ["/a", "/a:/b:x", "a:/b"] {
            let mut a = args(&format!("--name c --image i --mount {bad}"));
            assert!(container_config(&mut a).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_container_takes_its_command_after_the_dashes() {
        let mut a = args("--name c --image i --env A=1 -- sh -c true");
        let c = container_config(&mut a).unwrap();
        a.finish().unwrap();
        assert_eq!(c.command, vec!["sh", "-c", "true"]);
        assert_eq!(c.log_path, "c_0.log");
        assert_eq!(c.envs[0].key, "A");
        assert!(container_config(&mut args("--name c")).is_err());
    }
}
