//! The OCI spec containerd wrote into the bundle, rewritten for the guest:
//! the rootfs is the one in the pod's shared directory, host paths the
//! spec bind-mounts are shared too, the pod's network is the VM's, and
//! host-side parts (hooks, namespace paths of host processes) go.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::mounts::{bind_into_share, MountError};
use crate::beneath::Dir;
use crate::sandbox::GUEST_SHARED_DIR;

pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("reading the OCI spec {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("sharing mount {destination} of the spec")]
    Mount {
        destination: String,
        source: Box<MountError>,
    },
}

/// The bundle's config.json.
pub fn read(bundle: &Path) -> Result<Value, SpecError> {
    let path = bundle.join("config.json");
    let fail = |reason: String| SpecError::Read {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| fail(e.to_string()))?;
    let spec: Value = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
    if !spec.is_object() {
        return Err(fail("not a JSON object".into()));
    }
    Ok(spec)
}

/// The sandbox's `linux.cgroupsPath`, if it names one: the VMM's cgroup
/// (as Kata's `sandbox_cgroup_only`).
pub fn cgroups_path(spec: &Value) -> Option<String> {
    spec["linux"]["cgroupsPath"]
        .as_str()
        .filter(|path| !path.is_empty())
        .map(String::from)
}

/// The pod a container belongs to, by Kata's rule: a CRI container
/// (`container-type=container`) belongs to its `sandbox-id`; a CRI sandbox
/// or a container without annotations (`ctr run`) is its own pod.
pub fn pod_id(spec: &Value, container_id: &str) -> String {
    let annotation = |key: &str| spec["annotations"][key].as_str().map(str::to_string);
    match annotation(ANNOTATION_CONTAINER_TYPE).as_deref() {
        Some("container") => annotation(ANNOTATION_SANDBOX_ID).unwrap_or(container_id.into()),
        _ => container_id.to_string(),
    }
}

/// The host network namespace the spec's container is to join (CRI's pod
/// netns, `/var/run/netns/cni-…`), if it names one by path.
pub fn network_namespace(spec: &Value) -> Option<&str> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|ns| ns["type"].as_str() == Some("network"))?["path"]
        .as_str()
        .filter(|path| !path.is_empty())
}

/// What the pod's containers may use in all, as containerd's CRI plugin
/// writes it on the sandbox container from the pod's
/// `linux.resources` (which kubelet fills with the sum of the containers'
/// limits for VM runtimes): memory in bytes, CPU quota and period.
const ANNOTATION_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
const ANNOTATION_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const ANNOTATION_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// The pod's workload, to size its VM by (Kata's static sandbox sizing).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PodWorkload {
    /// The containers' memory limits, MiB rounded up (0: none given).
    pub memory_mib: u32,
    /// The containers' CPU limits in whole CPUs, quota / period rounded up
    /// (0: none given).
    pub vcpus: u32,
}

/// The pod's workload: for a CRI container what its sandbox annotations
/// announce (none for a CRI container without them); for a container
/// outside CRI (`ctr run`, nerdctl), which is a pod of its own, its own
/// memory and CPU limits. An annotation that is not a number is an error
/// naming it.
pub fn pod_workload(spec: &Value) -> Result<PodWorkload, String> {
    let (memory, quota, period) = if spec["annotations"][ANNOTATION_CONTAINER_TYPE].is_null() {
        let resources = &spec["linux"]["resources"];
        let limit = |value: &Value| value.as_i64().unwrap_or(0);
        (
            limit(&resources["memory"]["limit"]),
            limit(&resources["cpu"]["quota"]),
            limit(&resources["cpu"]["period"]),
        )
    } else {
        let number = |key: &str| -> Result<i64, String> {
            match spec["annotations"][key].as_str() {
                None => Ok(0),
                Some(text) => text
                    .trim()
                    .parse()
                    .map_err(|e| format!("annotation {key}={text:?}: {e}")),
            }
        };
        (
            number(ANNOTATION_SANDBOX_MEMORY)?,
            number(ANNOTATION_SANDBOX_CPU_QUOTA)?,
            number(ANNOTATION_SANDBOX_CPU_PERIOD)?,
        )
    };
    let vcpus = if quota > 0 && period > 0 {
        (quota as u64).div_ceil(period as u64)
    } else {
        0
    };
    Ok(PodWorkload {
        memory_mib: u32::try_from((memory.max(0) as u64).div_ceil(1 << 20)).unwrap_or(u32::MAX),
        vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
    })
}

/// Whether the container is a CRI sandbox (pause) container.
pub fn is_cri_sandbox(spec: &Value) -> bool {
    spec["annotations"][ANNOTATION_CONTAINER_TYPE].as_str() == Some("sandbox")
}

/// Rewrites `spec` for the guest, bind-mounting the host paths it names
/// under `share` (the container's directory in the pod's private tree,
/// `<mounts>/<container id>`, which the guest sees as `<shared>/<container
/// id>`). The rootfs itself is `share/rootfs`.
///
/// Namespaces the spec joins by path (CRI: the pod sandbox's IPC, UTS and,
/// with a shared process namespace, PID) join the same namespaces of the
/// pod's sandbox container in the guest, whose init has guest pid
/// `sandbox_pid`; other paths name host namespaces and are dropped (the
/// container gets new ones).
pub fn for_guest(
    mut spec: Value,
    container_id: &str,
    share: &Dir,
    sandbox_pid: Option<u32>,
) -> Result<Value, SpecError> {
    spec["root"]["path"] = json!("rootfs");
    if let Some(object) = spec.as_object_mut() {
        // Hooks name host binaries; they have no meaning in the guest.
        object.remove("hooks");
    }
    if let Some(mounts) = spec["mounts"].as_array_mut() {
        let mut kept = Vec::with_capacity(mounts.len());
        for (index, mount) in mounts.drain(..).enumerate() {
            if let Some(mount) = guest_mount(mount, index, container_id, share)? {
                kept.push(mount);
            }
        }
        *mounts = kept;
    }
    if let Some(namespaces) = spec["linux"]["namespaces"].as_array_mut() {
        // The pod's network is the VM's: containers stay in the guest's
        // network namespace. Paths name host processes' namespaces.
        namespaces.retain(|ns| ns["type"].as_str() != Some("network"));
        for ns in namespaces.iter_mut() {
            let kind = ns["type"].as_str().unwrap_or_default().to_string();
            let Some(object) = ns.as_object_mut() else {
                continue;
            };
            match (object.contains_key("path"), sandbox_pid) {
                (true, Some(pid)) if POD_SHARED_NAMESPACES.contains(&kind.as_str()) => {
                    object.insert("path".into(), json!(format!("/proc/{pid}/ns/{kind}")));
                }
                _ => {
                    object.remove("path");
                }
            }
        }
    }
    Ok(spec)
}

/// Namespaces a pod's containers share with its sandbox in the guest (their
/// OCI type is their /proc/PID/ns file name).
const POD_SHARED_NAMESPACES: [&str; 3] = ["ipc", "uts", "pid"];

fn is_bind(mount: &Value) -> bool {
    mount["type"].as_str() == Some("bind")
        || mount["options"]
            .as_array()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
}

/// One mount of the spec as the guest needs it: binds of host paths are
/// shared; the pod's /dev/shm becomes a tmpfs of the guest's; binds of
/// host devices and kernel file systems are dropped.
fn guest_mount(
    mut mount: Value,
    index: usize,
    container_id: &str,
    share: &Dir,
) -> Result<Option<Value>, SpecError> {
    if !is_bind(&mount) {
        return Ok(Some(mount));
    }
    let destination = mount["destination"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if destination == "/dev/shm" {
        return Ok(Some(json!({
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        })));
    }
    let source = PathBuf::from(mount["source"].as_str().unwrap_or_default());
    let drop_it = |why: &str| {
        tracing::warn!(
            "{container_id}: dropping bind mount of host {} on {destination}: {why}",
            source.display()
        );
        Ok(None)
    };
    // Named so (the canonical path is checked again when it is opened).
    if ["/proc", "/sys", "/dev"]
        .iter()
        .any(|p| source.starts_with(p))
    {
        return drop_it("a kernel tree of the host");
    }
    let read_only = mount["options"]
        .as_array()
        .is_some_and(|o| o.iter().any(|o| o == "ro"));
    let name = format!("mounts/{index}");
    match bind_into_share(&source, share, Path::new(&name), read_only) {
        Ok(()) => {}
        Err(MountError::Refused { why, .. }) => return drop_it(&why),
        Err(source) => {
            return Err(SpecError::Mount {
                destination: destination.clone(),
                source: Box::new(source),
            })
        }
    }
    mount["source"] = json!(format!("{GUEST_SHARED_DIR}/{container_id}/{name}"));
    Ok(Some(mount))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_annotations_give_the_pods_workload() {
        let spec = json!({"annotations": {
            ANNOTATION_CONTAINER_TYPE: "sandbox",
            ANNOTATION_SANDBOX_MEMORY: "536870913",
            ANNOTATION_SANDBOX_CPU_QUOTA: "150000",
            ANNOTATION_SANDBOX_CPU_PERIOD: "100000",
        }});
        assert_eq!(
            pod_workload(&spec).unwrap(),
            PodWorkload {
                memory_mib: 513,
                vcpus: 2
            }
        );
        // Unlimited (-1 quota, 0 memory) or not given: nothing to add.
        let unlimited = json!({"annotations": {
            ANNOTATION_CONTAINER_TYPE: "sandbox",
            ANNOTATION_SANDBOX_MEMORY: "0",
            ANNOTATION_SANDBOX_CPU_QUOTA: "-1",
            ANNOTATION_SANDBOX_CPU_PERIOD: "100000",
        }});
        assert_eq!(pod_workload(&unlimited).unwrap(), PodWorkload::default());
        let cri = json!({"annotations": {ANNOTATION_CONTAINER_TYPE: "sandbox"},
            "linux": {"resources": {"memory": {"limit": 1 << 30}}}});
        assert_eq!(pod_workload(&cri).unwrap(), PodWorkload::default());
        let bad = json!({"annotations": {
            ANNOTATION_CONTAINER_TYPE: "sandbox",
            ANNOTATION_SANDBOX_MEMORY: "lots",
        }});
        let err = pod_workload(&bad).unwrap_err();
        assert!(err.contains("io.kubernetes.cri.sandbox-memory"), "{err}");
    }

    #[test]
    fn a_container_outside_cri_is_sized_by_its_own_limits() {
        let spec = json!({"linux": {"resources": {
            "memory": {"limit": 402653184},
            "cpu": {"quota": 250000, "period": 100000},
        }}});
        assert_eq!(
            pod_workload(&spec).unwrap(),
            PodWorkload {
                memory_mib: 384,
                vcpus: 3
            }
        );
        assert_eq!(pod_workload(&json!({})).unwrap(), PodWorkload::default());
        // ctr's default quota is -1 (none).
        let unlimited = json!({"linux": {"resources": {"cpu": {"quota": -1, "period": 100000}}}});
        assert_eq!(pod_workload(&unlimited).unwrap(), PodWorkload::default());
    }

    #[test]
    fn cri_containers_join_their_sandbox() {
        let container = json!({"annotations": {
            ANNOTATION_CONTAINER_TYPE: "container", ANNOTATION_SANDBOX_ID: "pod1"}});
        assert_eq!(pod_id(&container, "c1"), "pod1");
        let sandbox = json!({"annotations": {ANNOTATION_CONTAINER_TYPE: "sandbox"}});
        assert_eq!(pod_id(&sandbox, "pod1"), "pod1");
        assert!(is_cri_sandbox(&sandbox));
        assert_eq!(pod_id(&json!({}), "c2"), "c2");
    }

    #[test]
    fn the_pod_netns_is_the_network_namespace_named_by_path() {
        let cri = json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}});
        assert_eq!(network_namespace(&cri), Some("/var/run/netns/cni-1"));
        let fresh = json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert_eq!(network_namespace(&fresh), None);
        let empty = json!({"linux": {"namespaces": [{"type": "network", "path": ""}]}});
        assert_eq!(network_namespace(&empty), None);
        assert_eq!(network_namespace(&json!({})), None);
    }

    #[test]
    fn the_guest_spec_uses_the_shared_rootfs_and_the_vm_network() {
        let spec = json!({
            "root": {"path": "/host/bundle/rootfs", "readonly": true},
            "hooks": {"prestart": [{"path": "/usr/bin/x"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["rbind"]},
                {"destination": "/dev/fuse", "type": "bind", "source": "/dev/fuse", "options": ["bind"]},
            ],
            "linux": {"namespaces": [
                {"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"}]},
        });
        let share = tempfile::tempdir().unwrap();
        let share = Dir::open(share.path()).unwrap();
        let guest = for_guest(spec.clone(), "c1", &share, None).unwrap();
        assert_eq!(guest["root"], json!({"path": "rootfs", "readonly": true}));
        assert!(guest.get("hooks").is_none());
        let mounts = guest["mounts"].as_array().unwrap();
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[1]["type"], "tmpfs");
        assert_eq!(
            guest["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "ipc"}])
        );
        // In a pod: the sandbox's IPC namespace in the guest.
        let guest = for_guest(spec, "c1", &share, Some(7)).unwrap();
        assert_eq!(
            guest["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "ipc", "path": "/proc/7/ns/ipc"}])
        );
    }

    #[test]
    fn a_missing_bind_source_names_the_mount() {
        let spec = json!({"mounts": [
            {"destination": "/data", "type": "bind", "source": "/no/such/dir", "options": ["rbind"]}]});
        let share = tempfile::tempdir().unwrap();
        let share = Dir::open(share.path()).unwrap();
        let err = for_guest(spec, "c1", &share, None).unwrap_err();
        let text = protocols::error_chain(&err);
        assert!(
            text.contains("/data") && text.contains("/no/such/dir"),
            "{text}"
        );
    }
}
