//! Pod networking for a private containerd ([`super::Options::network`]):
//! the CNI configuration it is given, and what CRI says of a pod's network.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::Containerd;

/// The CNI network's name (in the conflist, and in CNI's cache file names).
pub const CNI_NETWORK: &str = "microvm-test";
/// The bridge in containerd's network namespace that the pods' veths join.
pub const BRIDGE: &str = "mvtest0";
/// The pods' subnet (host-local IPAM), its prefix length and gateway (the
/// bridge's address).
pub const POD_SUBNET: &str = "10.250.0.0/24";
pub const POD_PREFIX_LEN: u8 = 24;
pub const POD_GATEWAY: &str = "10.250.0.1";
/// The pods' IPv6 subnet (a second host-local range: pods are dual-stack)
/// and its gateway.
pub const POD_SUBNET6: &str = "fd00:10:250::/64";
pub const POD_GATEWAY6: &str = "fd00:10:250::1";
/// The pods' MTU: not the default 1500, so a test sees it reach the pod.
pub const POD_MTU: u32 = 1400;

/// The CNI configuration (`DIR/cni/10-microvm.conflist`) of an instance in
/// `dir`: CNI's bridge plugin on [`BRIDGE`] as the pods' gateway, no
/// masquerading, MTU [`POD_MTU`], and host-local IPAM in [`POD_SUBNET`] and
/// [`POD_SUBNET6`] (dual-stack, default routes for both families) keeping
/// its reservations in `DIR/ipam` (so they go with the instance).
pub fn conflist(dir: &Path) -> String {
    let config = json!({
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": false,
            "mtu": POD_MTU,
            "ipam": {
                "type": "host-local",
                "dataDir": dir.join("ipam").display().to_string(),
                "ranges": [[{ "subnet": POD_SUBNET }], [{ "subnet": POD_SUBNET6 }]],
                "routes": [{ "dst": "0.0.0.0/0" }, { "dst": "::/0" }],
            },
        }],
    });
    serde_json::to_string_pretty(&config).expect("a JSON value prints")
}

impl Containerd<'_> {
    /// PodSandboxStatus with containerd's verbose `info` (decoded by `cri`:
    /// `runtimeSpec`, `cniResult`, …).
    pub fn pod_status(&self, pod_id: &str) -> Result<Value> {
        self.cri(&["inspectp", "--verbose", pod_id])
    }

    /// The pod's IP address as CRI reports it (`status.network.ip`).
    pub fn pod_ip(&self, pod_id: &str) -> Result<String> {
        let status = self.cri(&["inspectp", pod_id])?;
        status["status"]["network"]["ip"]
            .as_str()
            .filter(|ip| !ip.is_empty())
            .map(String::from)
            .with_context(|| format!("pod {pod_id} has no IP: {status}"))
    }

    /// The pod's IPv6 address as CRI reports it (one of
    /// `status.network.additional_ips`).
    pub fn pod_ipv6(&self, pod_id: &str) -> Result<String> {
        let status = self.cri(&["inspectp", pod_id])?;
        status["status"]["network"]["additional_ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|entry| entry["ip"].as_str())
            .find(|ip| ip.contains(':'))
            .map(String::from)
            .with_context(|| format!("pod {pod_id} has no IPv6 address: {status}"))
    }

    /// The path of the pod's network namespace (`/var/run/netns/cni-…`),
    /// from its sandbox's runtime spec; None when it has the node's.
    pub fn pod_netns_path(&self, pod_id: &str) -> Result<Option<String>> {
        let status = self.pod_status(pod_id)?;
        Ok(netns_path(&status))
    }

    /// The MAC address CNI reported for the pod's `eth0` (lower case).
    pub fn pod_mac(&self, pod_id: &str) -> Result<String> {
        let status = self.pod_status(pod_id)?;
        status["info"]["info"]["cniResult"]["Interfaces"]["eth0"]["Mac"]
            .as_str()
            .filter(|mac| !mac.is_empty())
            .map(str::to_lowercase)
            .with_context(|| {
                format!(
                    "no MAC of eth0 in pod {pod_id}'s CNI result: {}",
                    status["info"]["info"]["cniResult"]
                )
            })
    }

    /// Remembers a pod's network namespace, checked by the leftover search
    /// and removed at teardown if still there.
    pub(super) fn track_pod_netns(&self, pod_id: &str) -> Result<()> {
        if self.netns().is_none() {
            return Ok(());
        }
        if let Some(path) = self.pod_netns_path(pod_id)? {
            if let Ok(mut paths) = self.pod_netns.lock() {
                paths.push(path);
            }
        }
        Ok(())
    }
}

/// The network namespace path in a verbose PodSandboxStatus answer.
fn netns_path(status: &Value) -> Option<String> {
    status["info"]["info"]["runtimeSpec"]["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|ns| ns["type"] == "network")
        .and_then(|ns| ns["path"].as_str())
        .filter(|path| !path.is_empty())
        .map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conflist_keeps_ipam_state_in_the_instance_directory() {
        let text = conflist(Path::new("/run/x/d"));
        let v: Value = serde_json::from_str(&text).unwrap();
        let bridge = &v["plugins"][0];
        assert_eq!(bridge["bridge"], BRIDGE);
        assert_eq!(bridge["mtu"], POD_MTU);
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(bridge["ipam"]["dataDir"], "/run/x/d/ipam");
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], POD_SUBNET);
        assert_eq!(bridge["ipam"]["ranges"][1][0]["subnet"], POD_SUBNET6);
        assert!(POD_SUBNET.ends_with(&format!("/{POD_PREFIX_LEN}")));
    }

    #[test]
    fn finds_the_network_namespace_in_the_runtime_spec() {
        let status = json!({"info": {"info": {"runtimeSpec": {"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1"},
        ]}}}}});
        assert_eq!(netns_path(&status).as_deref(), Some("/var/run/netns/cni-1"));
        let node = json!({"info": {"info": {"runtimeSpec": {"linux": {"namespaces": [
            {"type": "pid"},
        ]}}}}});
        assert_eq!(netns_path(&node), None);
    }
}
