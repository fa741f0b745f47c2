//! Pod networking through containerd's CRI and CNI (Debian's
//! containernetworking-plugins: bridge + host-local, the conflist of
//! `containerd::conflist`), where VMs run. Each containerd here runs in a
//! network namespace of its own, the pods' "node": their bridge and gateway
//! are there, and so are the host-side probes ([`Containerd::sh_in_netns`]).
//!
//! Each scenario is one body run for runc, the control, and for our shim
//! (`kata`, whose pod VM gets a virtio-net NIC on a tap in the pod's network
//! namespace, tc-redirected to CNI's veth); without that wiring the kata
//! variants fail, bounded in time, with both sides' view of the network.
//! Every test ends by asserting that nothing is left, network included: no
//! veth or tap, no pod network namespace, no IPAM reservation, no CNI cache
//! entry.
//!
//! `cargo test -p microvm-tests --test pod_network` (`-- runc` for the
//! controls only).

use std::time::Duration;

use microvm_tests::containerd::{
    text, Containerd, Options, Pod, KATA_HANDLER, POD_GATEWAY, POD_GATEWAY6, POD_MTU,
    POD_PREFIX_LEN, RUNC_HANDLER, TIMEOUT,
};
use microvm_tests::{vm_host, VmHost};

fn host() -> &'static VmHost {
    vm_host(env!("CARGO_BIN_EXE_testhost"))
}

/// The port the pods' httpd listens on.
const PORT: u16 = 8080;

/// How long a probe keeps trying to reach a server that should be up (the
/// container runs, but its httpd or the guest's NIC may still be starting).
const REACH_SECS: u32 = 60;

/// A private containerd with pod networking; panics with the reason when it
/// cannot start, or when a handler needs a shim not built.
fn containerd(handlers: &[&str]) -> Containerd<'static> {
    let mut options = Options::new(env!("CARGO_BIN_EXE_cri"));
    for handler in handlers {
        if let Err(e) = options.require_shim(handler) {
            panic!("the {handler} tests cannot run: {e:#}");
        }
    }
    options.network = true;
    Containerd::start_for_test(host(), options)
}

/// What a failing kata variant most likely lacks.
fn hint(handler: &str) -> &'static str {
    if handler == KATA_HANDLER {
        "\n(kata: the pod's VM needs its NIC: the VMM's virtio-net on a tap in the pod's \
         network namespace, tc redirects to the veth, and the agent configuring eth0; \
         see docs/design/pod-networking.md)"
    } else {
        ""
    }
}

/// A pod of `handler` in its own network namespace.
fn network_pod(cd: &Containerd, name: &str, handler: &str, extra: &[&str]) -> (Pod, String) {
    let mut pod = cd.pod(name, handler);
    pod.extra.push("--pod-network".into());
    pod.extra.extend(extra.iter().map(|s| s.to_string()));
    let pod_id = cd
        .run_pod(&pod)
        .unwrap_or_else(|e| panic!("RunPodSandbox {name} ({handler}): {e:#}"));
    (pod, pod_id)
}

/// Creates and starts a container in the pod and waits until it runs.
fn run_container(
    cd: &Containerd,
    pod: &Pod,
    pod_id: &str,
    name: &str,
    extra: &[&str],
    command: &[&str],
) -> String {
    let id = cd
        .create_container(pod_id, pod, name, extra, command)
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e:#}"));
    cd.cri(&["start", &id])
        .unwrap_or_else(|e| panic!("StartContainer {name}: {e:#}"));
    cd.cri(&["wait", "--state", "RUNNING", "--for", "300", &id])
        .unwrap_or_else(|e| panic!("{name} does not run: {e:#}"));
    id
}

/// A pod serving `page` at `/` with busybox httpd on [`PORT`]: (pod, pod
/// id, pod IP).
fn serving_pod(cd: &Containerd, name: &str, handler: &str, page: &str) -> (Pod, String, String) {
    let (pod, pod_id) = network_pod(cd, name, handler, &[]);
    let page_env = format!("PAGE={page}");
    run_container(
        cd,
        &pod,
        &pod_id,
        "httpd",
        &["--env", &page_env],
        &[
            "sh",
            "-c",
            &format!(
                "mkdir -p /www && echo \"$PAGE\" > /www/index.html && exec httpd -f -p {PORT} -h /www"
            ),
        ],
    );
    let ip = cd
        .pod_ip(&pod_id)
        .unwrap_or_else(|e| panic!("the IP of pod {name}: {e:#}"));
    (pod, pod_id, ip)
}

/// A shell loop fetching `http://IP:PORT/` with busybox wget until it
/// answers (then prints the page) or [`REACH_SECS`] tries failed (then
/// prints wget's last error and fails). Not wget's `-T`: Debian's busybox
/// 1.35 wget crashes with it; busybox `timeout` bounds each try instead.
fn fetch_script(wget: &str, ip: &str) -> String {
    format!(
        "i=0; while [ $i -lt {REACH_SECS} ]; do \
             if out=$(timeout 5 {wget} -q -O - http://{ip}:{PORT}/ 2>&1); then echo \"$out\"; exit 0; fi; \
             i=$((i + 1)); sleep 1; \
         done; echo \"wget http://{ip}:{PORT}/ kept failing: $out\"; exit 1"
    )
}

/// What the node side and the pod's network namespace look like, for
/// failure messages.
fn diagnose(cd: &Containerd, pod_id: &str) -> String {
    let mut report = String::new();
    match cd.sh_in_netns(
        "echo '# containerd netns: ip -o addr; ip route; ip -o link'; ip -o addr; ip route; ip -o link",
        b"",
        Duration::from_secs(60),
    ) {
        Ok(out) => report += &format!("\n{}{}", out.stdout_text(), out.stderr_text()),
        Err(e) => report += &format!("\n(containerd's netns: {e:#})"),
    }
    if let Ok(Some(path)) = cd.pod_netns_path(pod_id) {
        if let Ok(out) = cd.sh(
            &format!(
                "echo '# pod netns {path}: ip -o addr; ip -o link; tc qdisc; tc filter (ingress)'; \
                 nsenter --net={path} sh -c 'ip -o addr; ip -o link; tc qdisc show; \
                 for l in $(ls /sys/class/net); do tc filter show dev $l ingress; done'"
            ),
            b"",
            Duration::from_secs(60),
        ) {
            report += &format!("{}{}", out.stdout_text(), out.stderr_text());
        }
    }
    report
}

/// `cri exec-sync` of `sh -c script` in `container`: (exit code, stdout,
/// stderr).
fn exec(cd: &Containerd, container: &str, script: &str) -> (i64, String, String) {
    let answer = cd
        .cri(&[
            "exec-sync",
            "--for",
            "300",
            container,
            "--",
            "sh",
            "-c",
            script,
        ])
        .unwrap_or_else(|e| panic!("exec-sync in {container}: {e:#}"));
    (
        answer["exit_code"].as_i64().unwrap_or(-1),
        text(&answer["stdout"]).to_string(),
        text(&answer["stderr"]).to_string(),
    )
}

/// Stops and removes a pod through CRI.
fn remove_pod(cd: &Containerd, pod_id: &str) {
    cd.cri(&["stopp", pod_id])
        .unwrap_or_else(|e| panic!("StopPodSandbox {pod_id}: {e:#}"));
    cd.cri(&["rmp", pod_id])
        .unwrap_or_else(|e| panic!("RemovePodSandbox {pod_id}: {e:#}"));
}

/// A pod running httpd answers at its pod IP from containerd's network
/// namespace (the node).
fn httpd_reachable_from_the_node(handler: &str) {
    let cd = containerd(&[handler]);
    let page = format!("hello from {handler}");
    let (_pod, pod_id, ip) = serving_pod(&cd, "web", handler, &page);
    assert_node_fetches(&cd, &pod_id, handler, &ip, &page);
    remove_pod(&cd, &pod_id);
    cd.assert_nothing_left();
}

/// The node (containerd's network namespace) fetches `page` from the pod's
/// httpd at `host` (an IPv4 address or a bracketed IPv6 one).
fn assert_node_fetches(cd: &Containerd, pod_id: &str, handler: &str, host: &str, page: &str) {
    let out = cd
        .sh_in_netns(&fetch_script("busybox wget", host), b"", TIMEOUT)
        .unwrap();
    assert!(
        out.status.success() && out.stdout_text().trim() == page,
        "the node cannot fetch {page:?} from the {handler} pod at {host}: {:?}\n{}{}{}{}",
        out.status,
        out.stdout_text(),
        out.stderr_text(),
        diagnose(cd, pod_id),
        hint(handler)
    );
}

/// Pods are dual-stack: once the container runs, its eth0 has the IPv6
/// address CRI reports (with the /64 of the CNI range), usable already (not
/// tentative: CNI did duplicate address detection before the pod started),
/// and an IPv6 default route via the bridge; the node fetches the pod's page
/// over IPv6.
fn ipv6_reaches_the_pod(handler: &str) {
    let cd = containerd(&[handler]);
    let page = format!("hello over IPv6 from {handler}");
    let (_pod, pod_id, _ip) = serving_pod(&cd, "web6", handler, &page);
    let ip6 = cd
        .pod_ipv6(&pod_id)
        .unwrap_or_else(|e| panic!("{e:#}{}", hint(handler)));
    let container = container_of(&cd, &pod_id);
    let (code, stdout, stderr) = exec(
        &cd,
        &container,
        "ip -o -6 addr show dev eth0 scope global; echo ---; ip -6 route show default",
    );
    let context = format!(
        "the {handler} container's IPv6 view (exit {code}):\n{stdout}{stderr}\nCRI: {ip6}{}{}",
        diagnose(&cd, &pod_id),
        hint(handler)
    );
    let parts: Vec<&str> = stdout.split("---\n").collect();
    assert_eq!(parts.len(), 2, "{context}");
    let addr = format!(" inet6 {ip6}/64 ");
    assert!(parts[0].contains(&addr), "eth0 lacks{addr}\n{context}");
    assert!(
        !parts[0].contains("tentative"),
        "eth0's IPv6 address is still tentative (duplicate address detection)\n{context}"
    );
    let default = format!("default via {POD_GATEWAY6} ");
    assert!(
        parts[1].lines().any(|l| l.starts_with(&default)),
        "no `{default}` route\n{context}"
    );
    assert_node_fetches(&cd, &pod_id, handler, &format!("[{ip6}]"), &page);
    remove_pod(&cd, &pod_id);
    cd.assert_nothing_left();
}

/// Two pods on the bridge, each serving a page, fetch each other's.
fn pods_reach_each_other(first: &str, second: &str) {
    let cd = containerd(&[first, second]);
    let pods: Vec<(String, String, String, String)> = [("one", first), ("two", second)]
        .iter()
        .map(|(name, handler)| {
            let page = format!("pod {name} ({handler})");
            let (_pod, pod_id, ip) = serving_pod(&cd, name, handler, &page);
            let container = container_of(&cd, &pod_id);
            (pod_id, ip, page, container)
        })
        .collect();
    for (from, to) in [(0, 1), (1, 0)] {
        let (from_pod, from_ip, _, container) = &pods[from];
        let (to_pod, to_ip, page, _) = &pods[to];
        let (code, stdout, stderr) = exec(&cd, container, &fetch_script("wget", to_ip));
        let handlers = [first, second];
        assert!(
            code == 0 && stdout.trim() == page,
            "the {} pod at {from_ip} cannot fetch {page:?} from the {} pod at {to_ip} \
             (exit {code}): {stdout}{stderr}\n--- from:{}\n--- to:{}{}{}",
            handlers[from],
            handlers[to],
            diagnose(&cd, from_pod),
            diagnose(&cd, to_pod),
            hint(handlers[from]),
            hint(handlers[to])
        );
    }
    for (pod_id, ..) in &pods {
        remove_pod(&cd, pod_id);
    }
    cd.assert_nothing_left();
}

/// The one container of a pod.
fn container_of(cd: &Containerd, pod_id: &str) -> String {
    let listed = cd.cri(&["ps", "--pod", pod_id]).unwrap();
    listed["items"][0]["id"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| panic!("pod {pod_id} has no container: {listed}"))
}

/// Inside the container: eth0 has the pod IP and the MAC CNI reported, the
/// MTU of the CNI configuration, and the default route goes to the bridge.
fn container_sees_its_pod_network(handler: &str) {
    let cd = containerd(&[handler]);
    let (pod, pod_id) = network_pod(&cd, "view", handler, &[]);
    let sleeper = run_container(&cd, &pod, &pod_id, "sleeper", &[], &["sleep", "100000"]);
    let ip = cd.pod_ip(&pod_id).unwrap();
    let mac = cd.pod_mac(&pod_id).unwrap();
    let (code, stdout, stderr) = exec(
        &cd,
        &sleeper,
        "ip -o -4 addr show eth0; echo ---; ip route; echo ---; \
         cat /sys/class/net/eth0/mtu; echo ---; cat /sys/class/net/eth0/address",
    );
    let parts: Vec<&str> = stdout.split("---\n").collect();
    let context = format!(
        "the {handler} container's view (exit {code}):\n{stdout}{stderr}\n\
         CNI: ip {ip}, mac {mac}{}{}",
        diagnose(&cd, &pod_id),
        hint(handler)
    );
    assert_eq!(parts.len(), 4, "{context}");
    let addr = format!(" inet {ip}/{POD_PREFIX_LEN} ");
    assert!(parts[0].contains(&addr), "eth0 lacks{addr}\n{context}");
    let default = format!("default via {POD_GATEWAY} ");
    assert!(
        parts[1].lines().any(|l| l.starts_with(&default)),
        "no `{default}` route\n{context}"
    );
    assert_eq!(
        parts[2].trim(),
        POD_MTU.to_string(),
        "eth0's MTU\n{context}"
    );
    assert_eq!(parts[3].trim(), mac, "eth0's MAC\n{context}");
    remove_pod(&cd, &pod_id);
    cd.assert_nothing_left();
}

/// The pod's DNS configuration and hostname from the CRI request reach the
/// container: its /etc/resolv.conf, /etc/hostname and /etc/hosts are the
/// files containerd wrote for the sandbox, and `hostname` answers h1.
fn dns_and_hostname_reach_the_container(handler: &str) {
    let cd = containerd(&[handler]);
    let (pod, pod_id) = network_pod(
        &cd,
        "dns",
        handler,
        &[
            "--hostname",
            "h1",
            "--dns-server",
            "10.250.0.53",
            "--dns-search",
            "example.test",
            "--dns-option",
            "ndots:2",
        ],
    );
    let sleeper = run_container(&cd, &pod, &pod_id, "sleeper", &[], &["sleep", "100000"]);
    let files = ["resolv.conf", "hostname", "hosts"];
    let (code, stdout, stderr) = exec(
        &cd,
        &sleeper,
        "cat /etc/resolv.conf; echo ---; cat /etc/hostname; echo ---; cat /etc/hosts; \
         echo ---; hostname",
    );
    let parts: Vec<&str> = stdout.split("---\n").collect();
    assert!(
        code == 0 && parts.len() == 4,
        "reading the {handler} container's files (exit {code}): {stdout}{stderr}"
    );
    let sandbox_dir = cd
        .dir()
        .join("root/io.containerd.grpc.v1.cri/sandboxes")
        .join(&pod_id);
    for (file, seen) in files.iter().zip(&parts) {
        let written = cd
            .read_file(&sandbox_dir.join(file).display().to_string())
            .unwrap();
        assert_eq!(
            *seen, written,
            "the {handler} container's /etc/{file} is not the one containerd wrote"
        );
    }
    let resolv: Vec<&str> = parts[0].lines().collect();
    for line in [
        "nameserver 10.250.0.53",
        "search example.test",
        "options ndots:2",
    ] {
        assert!(
            resolv.contains(&line),
            "no {line:?} in resolv.conf: {resolv:?}"
        );
    }
    assert_eq!(parts[1], "h1\n", "/etc/hostname");
    assert_eq!(
        parts[3].trim(),
        "h1",
        "`hostname` in the {handler} container"
    );
    remove_pod(&cd, &pod_id);
    cd.assert_nothing_left();
}

/// Removing the pod leaves its network namespace empty: no tap, no ingress
/// qdisc, only `lo` (CNI took the veth), and the pod's sandbox process (runc:
/// pause; kata: the VMM) is gone. The namespace is kept alive by a bind
/// mount made before StopPodSandbox.
fn teardown_empties_the_pod_netns(handler: &str) {
    let cd = containerd(&[handler]);
    let (pod, pod_id) = network_pod(&cd, "gone", handler, &[]);
    run_container(&cd, &pod, &pod_id, "sleeper", &[], &["sleep", "100000"]);
    let netns = cd
        .pod_netns_path(&pod_id)
        .unwrap()
        .unwrap_or_else(|| panic!("pod {pod_id} has no network namespace"));
    let keep = cd.dir().join("keep-netns").display().to_string();
    let sandbox_pid = cd
        .sh(
            &format!(
                "set -e; touch {keep}; mount --bind {netns} {keep}; \
                 ctr -a $S -n k8s.io task ls | awk '$1 == \"{pod_id}\" {{print $2}}'"
            ),
            b"",
            TIMEOUT,
        )
        .unwrap();
    let sandbox_pid = sandbox_pid.stdout_text().trim().to_string();
    assert!(!sandbox_pid.is_empty(), "no sandbox task for pod {pod_id}");
    let comm = cd.read_file(&format!("/proc/{sandbox_pid}/comm")).unwrap();
    let before = cd
        .sh(
            &format!("nsenter --net={keep} sh -c 'ip -o link show; echo ---; tc qdisc show'"),
            b"",
            TIMEOUT,
        )
        .unwrap()
        .stdout_text();
    // What the checks below must see go: the veth, and for kata the tap and
    // the ingress qdiscs of the tc redirects.
    let expected: &[&str] = if handler == KATA_HANDLER {
        &[
            " eth0@",
            " tap0_mvm:",
            "qdisc ingress ffff: dev eth0",
            "qdisc ingress ffff: dev tap0_mvm",
        ]
    } else {
        &[" eth0@"]
    };
    for what in expected {
        assert!(
            before.contains(what),
            "no {what:?} in the running {handler} pod's netns:\n{before}{}",
            hint(handler)
        );
    }
    remove_pod(&cd, &pod_id);
    let after = cd
        .sh(
            &format!(
                "nsenter --net={keep} sh -c 'ip -o link show; echo ---; tc qdisc show'; \
                 echo ---; cat /proc/{sandbox_pid}/comm 2>/dev/null; \
                 umount {keep} && rm {keep}"
            ),
            b"",
            TIMEOUT,
        )
        .unwrap();
    let text = after.stdout_text();
    let parts: Vec<&str> = text.split("---\n").collect();
    let context = format!(
        "the {handler} pod's netns before StopPodSandbox:\n{before}\nafter RemovePodSandbox:\n\
         {text}{}",
        after.stderr_text()
    );
    assert!(after.status.success() && parts.len() == 3, "{context}");
    let links: Vec<&str> = parts[0]
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|l| l.trim_end_matches(':'))
        .collect();
    assert_eq!(
        links,
        vec!["lo"],
        "links left in the pod's netns\n{context}"
    );
    assert!(
        !parts[1].contains("ingress") && !parts[0].contains("_mvm"),
        "a tap or ingress qdisc is left\n{context}"
    );
    assert_ne!(
        parts[2].trim(),
        comm.trim(),
        "the pod's sandbox process {sandbox_pid} ({}) outlived the pod\n{context}",
        comm.trim()
    );
    cd.assert_nothing_left();
}

#[test]
fn httpd_in_a_pod_is_reachable_at_its_pod_ip_runc() {
    httpd_reachable_from_the_node(RUNC_HANDLER);
}

#[test]
fn httpd_in_a_pod_is_reachable_at_its_pod_ip_kata() {
    httpd_reachable_from_the_node(KATA_HANDLER);
}

#[test]
fn ipv6_reaches_the_pod_runc() {
    ipv6_reaches_the_pod(RUNC_HANDLER);
}

#[test]
fn ipv6_reaches_the_pod_kata() {
    ipv6_reaches_the_pod(KATA_HANDLER);
}

#[test]
fn pods_on_the_bridge_reach_each_other_runc() {
    pods_reach_each_other(RUNC_HANDLER, RUNC_HANDLER);
}

/// A kata pod and a runc pod (the control) on one bridge.
#[test]
fn pods_on_the_bridge_reach_each_other_kata() {
    pods_reach_each_other(KATA_HANDLER, RUNC_HANDLER);
}

#[test]
fn container_sees_pod_ip_route_mtu_and_mac_runc() {
    container_sees_its_pod_network(RUNC_HANDLER);
}

#[test]
fn container_sees_pod_ip_route_mtu_and_mac_kata() {
    container_sees_its_pod_network(KATA_HANDLER);
}

#[test]
fn dns_config_and_hostname_reach_the_container_runc() {
    dns_and_hostname_reach_the_container(RUNC_HANDLER);
}

#[test]
fn dns_config_and_hostname_reach_the_container_kata() {
    dns_and_hostname_reach_the_container(KATA_HANDLER);
}

#[test]
fn removing_the_pod_empties_its_netns_runc() {
    teardown_empties_the_pod_netns(RUNC_HANDLER);
}

#[test]
fn removing_the_pod_empties_its_netns_kata() {
    teardown_empties_the_pod_netns(KATA_HANDLER);
}

/// The harness itself: a forgotten network pod is reported (its network
/// namespace, its veth on the bridge, its address, CNI's cache), and the
/// teardown removes it all, containerd's network namespace included.
#[test]
fn network_leftovers_are_reported_and_torn_down_runc() {
    let mut cd = containerd(&[RUNC_HANDLER]);
    let (_pod, pod_id) = network_pod(&cd, "forgotten", RUNC_HANDLER, &[]);
    let ip = cd.pod_ip(&pod_id).unwrap();
    let netns = cd.pod_netns_path(&pod_id).unwrap().unwrap();
    let left = cd.leftovers().unwrap();
    let has = |prefix: &str, needle: &str| {
        left.iter()
            .any(|l| l.starts_with(prefix) && l.contains(needle))
    };
    for (prefix, needle) in [
        ("pod network namespace:", netns.as_str()),
        ("veth in containerd's netns:", "veth"),
        ("IPAM reservation:", ip.as_str()),
        ("CNI result cache:", pod_id.as_str()),
    ] {
        assert!(has(prefix, needle), "no {prefix} {needle} in {left:#?}");
    }
    let name = cd.netns().unwrap().to_string();
    cd.stop().unwrap();
    let left = cd.leftovers().unwrap();
    assert!(left.is_empty(), "{left:#?}");
    let gone = host()
        .run(
            &["sh", "-c", &format!("ls /run/netns/{name} {netns} 2>&1")],
            b"",
            TIMEOUT,
        )
        .unwrap();
    assert!(
        !gone.status.success(),
        "a network namespace outlived the teardown: {}",
        gone.stdout_text()
    );
}
