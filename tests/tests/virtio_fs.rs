//! virtio-fs end to end: `microvm run --guest --share DIR` boots a real VM
//! whose VMM serves DIR (fuse-backend-rs's passthrough file system in the
//! VMM process); the guest mounts it by hand (`mount -t virtiofs microvm`)
//! and what it sees and does must match the host directory. On PVM machines
//! these run inside the KVM test host: each test's shell script creates the
//! shared directory there, so the VMM and the checks see the same files.

use std::time::Duration;

use microvm_tests::{vm_host, workspace_binary, ExitStatus, Output, VmHost};

fn host() -> &'static VmHost {
    vm_host(env!("CARGO_BIN_EXE_testhost"))
}

fn microvm() -> String {
    workspace_binary("microvm").unwrap().display().to_string()
}

const TIMEOUT: Duration = Duration::from_secs(600);

/// Inside the nested test host a boot under load can take tens of seconds.
const AGENT_TIMEOUT: &str = "MICROVM_AGENT_TIMEOUT=120";

/// Where VMs run: makes a fresh shared directory `$d`, runs `host_before`,
/// then `microvm run --guest --share $d` with `guest` as its shell script
/// (fed on stdin, run after mounting the share at /mnt, unmounted after),
/// then `host_after`. Fails at the first failing step.
fn with_share(host_before: &str, guest: &str, host_after: &str) -> Output {
    let script = format!(
        "set -eu; export {AGENT_TIMEOUT}; d=$(mktemp -d); g=$(mktemp); trap 'rm -rf $d $g' EXIT; \
         cat > $g <<'GUEST_SCRIPT'\n\
         set -eu; mkdir -p /mnt; mount -t virtiofs microvm /mnt; cd /mnt\n\
         {guest}\n\
         cd /; umount /mnt\n\
         GUEST_SCRIPT\n\
         {host_before}\n\
         {microvm} run --guest --memory 512 --share $d -- sh -s < $g\n\
         {host_after}\n",
        microvm = microvm()
    );
    host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap()
}

/// The text after `label` on the line that starts with it.
fn field(stdout: &str, label: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} in: {stdout}"))
        .trim()
        .to_string()
}

fn assert_ok(out: &Output) {
    assert_eq!(
        out.status,
        ExitStatus::Code(0),
        "stdout: {}\nstderr: {}",
        out.stdout_text(),
        out.stderr_text()
    );
}

#[test]
fn a_host_file_is_read_in_the_guest_and_a_guest_write_reaches_the_host() {
    let out = with_share(
        "echo 'written on the host' > $d/from-host",
        "cat from-host; echo 'written in the guest' > from-guest",
        "echo \"host sees: $(cat $d/from-guest)\"",
    );
    assert_ok(&out);
    let stdout = out.stdout_text();
    assert!(stdout.contains("written on the host\n"), "{stdout}");
    assert!(
        stdout.contains("host sees: written in the guest\n"),
        "{stdout}"
    );
}

#[test]
fn a_64_mib_file_keeps_its_checksum_both_ways() {
    let out = with_share(
        "dd if=/dev/urandom of=$d/host-big bs=1M count=64 2>/dev/null; echo \"host-big on host: $(md5sum < $d/host-big)\"",
        "echo \"host-big in guest: $(md5sum < host-big)\"\n\
         dd if=/dev/urandom of=guest-big bs=1M count=64 2>/dev/null\n\
         echo \"guest-big in guest: $(md5sum < guest-big)\"",
        "echo \"guest-big on host: $(md5sum < $d/guest-big)\"; \
         echo \"guest-big size: $(stat -c %s $d/guest-big)\"",
    );
    assert_ok(&out);
    let stdout = out.stdout_text();
    let host_on_host = field(&stdout, "host-big on host:");
    let guest_on_host = field(&stdout, "guest-big on host:");
    assert_eq!(
        host_on_host,
        field(&stdout, "host-big in guest:"),
        "{stdout}"
    );
    assert_eq!(
        guest_on_host,
        field(&stdout, "guest-big in guest:"),
        "{stdout}"
    );
    assert_ne!(host_on_host, guest_on_host, "two random files cannot match");
    assert_eq!(field(&stdout, "guest-big size:"), "67108864", "{stdout}");
}

#[test]
fn a_name_the_host_creates_after_the_guest_missed_it_shows_up() {
    // The guest caches "no such name" (a negative entry) for the share's
    // entry timeout, 5 s: a file the host creates meanwhile must show up
    // once it has passed, not be hidden for good. The host creates `late`
    // when the guest asks (by creating `asked`) after looking it up.
    let out = with_share(
        "(i=0; while [ ! -e $d/asked ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
          echo 'made late' > $d/late) &",
        "if [ -e late ]; then echo 'late too early'; fi\n\
         : > asked\n\
         i=0; while [ ! -e late ] && [ $i -lt 40 ]; do sleep 1; i=$((i+1)); done\n\
         echo \"late seen: $(cat late)\"",
        "",
    );
    assert_ok(&out);
    let stdout = out.stdout_text();
    assert!(!stdout.contains("late too early"), "{stdout}");
    assert_eq!(field(&stdout, "late seen:"), "made late", "{stdout}");
}

#[test]
fn rm_rf_of_a_directory_of_many_files_removes_them_all() {
    // `rm -rf` reads a batch of names, removes them, reads on from where it
    // was. On a share whose directory offsets are positions among the live
    // names (tmpfs before Linux 6.6: the test host's), seeking back to an
    // offset after removals skipped names, and rmdir failed with
    // "Directory not empty".
    let out = with_share(
        "mkdir $d/many; (cd $d/many && seq 1 600 | xargs touch)",
        "echo \"guest saw: $(ls many | wc -l)\"; echo \"dots:\" $(ls -a many | head -n 2); \
         rm -rf many",
        "echo \"host left: $(ls $d | wc -l)\"",
    );
    assert_ok(&out);
    let stdout = out.stdout_text();
    assert_eq!(field(&stdout, "guest saw:"), "600", "{stdout}");
    // As on every Linux file system (and under runc), "." and ".." are listed.
    assert_eq!(field(&stdout, "dots:"), ". ..", "{stdout}");
    assert_eq!(field(&stdout, "host left:"), "0", "{stdout}");
}

#[test]
fn namespace_operations_in_the_guest_show_on_the_host() {
    // mkdir, rename, unlink, symlink, hard link, chmod, and 1000 entries
    // read back by readdir, both ways.
    let guest = r#"
mkdir -p dir/sub; echo data > dir/file
mv dir/file dir/renamed
echo gone > doomed; rm doomed
ln -s renamed dir/link; ln dir/renamed dir/hard
chmod 0640 dir/renamed; chmod 0711 dir/sub
mkdir many; cd many; i=0; while [ $i -lt 1000 ]; do : > f$i; i=$((i+1)); done; cd ..
echo "guest readdir: $(ls many | wc -l) $(ls many | sort | md5sum)"
echo "guest sees host dir: $(ls -A fromhost | wc -l)"
echo "guest link: $(readlink dir/link) $(cat dir/link)"
echo "guest nlink: $(stat -c %h dir/renamed)"
echo "guest modes: $(stat -c %a dir/renamed) $(stat -c %a dir/sub)"
"#;
    let out = with_share(
        "mkdir $d/fromhost; i=0; while [ $i -lt 1000 ]; do : > $d/fromhost/h$i; i=$((i+1)); done",
        guest,
        "echo \"host readdir: $(ls $d/many | wc -l) $(ls $d/many | sort | md5sum)\"; \
         echo \"host renamed: $(cat $d/dir/renamed) $(stat -c %a $d/dir/renamed) $(stat -c %h $d/dir/renamed)\"; \
         echo \"host sub: $(stat -c %a $d/dir/sub) $(test -d $d/dir/sub && echo dir)\"; \
         echo \"host old name: $(test -e $d/dir/file && echo present || echo absent)\"; \
         echo \"host doomed: $(test -e $d/doomed && echo present || echo absent)\"; \
         echo \"host link: $(readlink $d/dir/link)\"; \
         echo \"host hard: $(stat -c %i $d/dir/hard) $(stat -c %i $d/dir/renamed)\"",
    );
    assert_ok(&out);
    let stdout = out.stdout_text();
    for expected in [
        "guest sees host dir: 1000\n",
        "guest link: renamed data\n",
        "guest nlink: 2\n",
        "guest modes: 640 711\n",
        "host renamed: data 640 2\n",
        "host sub: 711 dir\n",
        "host old name: absent\n",
        "host doomed: absent\n",
        "host link: renamed\n",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
    let (guest_list, host_list) = (
        field(&stdout, "guest readdir:"),
        field(&stdout, "host readdir:"),
    );
    assert!(guest_list.starts_with("1000 "), "{stdout}");
    assert_eq!(guest_list, host_list, "the same 1000 names: {stdout}");
    let hard = field(&stdout, "host hard:");
    let inodes: Vec<&str> = hard.split_whitespace().collect();
    assert_eq!(inodes.len(), 2, "{stdout}");
    assert_eq!(
        inodes[0], inodes[1],
        "a hard link is the same inode: {stdout}"
    );
}

#[test]
fn a_missing_share_is_a_clear_error() {
    let microvm = microvm();
    let vmm = workspace_binary("microvm-vmm")
        .unwrap()
        .display()
        .to_string();
    let script = format!(
        "export {AGENT_TIMEOUT}; f=$(mktemp); \
         {microvm} run --guest --share /no/such/share -- true; echo \"rc=$?\"; \
         {microvm} run --guest --share $f -- true; echo \"rc=$?\"; \
         {vmm} --kernel /dev/null --fs microvm=/no/such/share; echo \"rc=$?\"; \
         rm -f $f"
    );
    let out = host().run(&["sh", "-c", &script], b"", TIMEOUT).unwrap();
    let (stdout, stderr) = (out.stdout_text(), out.stderr_text());
    assert_eq!(
        stdout.lines().filter(|l| *l == "rc=1").count(),
        3,
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "one line each: {stderr}");
    assert!(
        lines[0].contains("--share /no/such/share") && lines[0].contains("no such directory"),
        "{stderr}"
    );
    assert!(lines[1].contains("no such directory"), "{stderr}");
    assert!(
        lines[2].contains("/no/such/share") && lines[2].contains("not a directory"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
