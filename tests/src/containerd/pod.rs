//! CRI pods the way the tests make them, through the `cri` client.

use anyhow::{Context, Result};
use serde_json::Value;

use super::Containerd;

/// A pod's configuration, given to both RunPodSandbox and CreateContainer
/// (which carries it again) as `cri` options.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The pod's metadata name (unique per instance).
    pub name: String,
    /// The CRI runtime handler: [`super::RUNC_HANDLER`] or [`super::KATA_HANDLER`].
    pub handler: String,
    /// Where CRI writes the containers' logs (where VMs run).
    pub log_dir: String,
    /// The cgroup the pod's cgroups go under.
    pub cgroup_parent: String,
    /// More `cri` pod options (`--pod-annotation K=V`, `--pod-network`, …).
    pub extra: Vec<String>,
}

impl Pod {
    /// The `cri` options for this pod's configuration.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--pod-name".to_string(),
            self.name.clone(),
            "--log-dir".into(),
            self.log_dir.clone(),
            "--cgroup-parent".into(),
            self.cgroup_parent.clone(),
        ];
        args.extend(self.extra.iter().cloned());
        args
    }
}

impl Containerd<'_> {
    /// A pod named `name` run by `handler`, logging under the instance's
    /// `logs/NAME` and with its cgroups under the instance's.
    pub fn pod(&self, name: &str, handler: &str) -> Pod {
        Pod {
            name: name.to_string(),
            handler: handler.to_string(),
            log_dir: self.dir.join("logs").join(name).display().to_string(),
            cgroup_parent: self.pod_cgroup_parent(),
            extra: Vec::new(),
        }
    }

    /// RunPodSandbox: the pod's id. With [`super::Options::network`], the
    /// pod's network namespace is remembered for the leftover search.
    pub fn run_pod(&self, pod: &Pod) -> Result<String> {
        let mut args = vec!["runp".to_string(), "--handler".into(), pod.handler.clone()];
        args.extend(pod.args());
        let answer = self.cri(&as_strs(&args))?;
        let id = string_field(&answer, "pod_id")?;
        self.track_pod_netns(&id)
            .with_context(|| format!("finding pod {id}'s network namespace"))?;
        Ok(id)
    }

    /// CreateContainer in pod `pod_id` of `name` from [`super::IMAGE`]
    /// running `command` (none: the image's `/bin/sh`), with more `cri`
    /// container options in `extra`: the container's id.
    pub fn create_container(
        &self,
        pod_id: &str,
        pod: &Pod,
        name: &str,
        extra: &[&str],
        command: &[&str],
    ) -> Result<String> {
        let mut args = vec!["create".to_string(), pod_id.to_string()];
        args.extend(pod.args());
        args.extend([
            "--name".into(),
            name.into(),
            "--image".into(),
            super::IMAGE.into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        if !command.is_empty() {
            args.push("--".into());
            args.extend(command.iter().map(|s| s.to_string()));
        }
        let answer = self.cri(&as_strs(&args))?;
        string_field(&answer, "container_id")
    }
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn string_field(answer: &Value, field: &str) -> Result<String> {
    answer[field]
        .as_str()
        .map(String::from)
        .with_context(|| format!("no {field} in {answer}"))
}
