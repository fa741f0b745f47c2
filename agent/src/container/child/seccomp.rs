//! The spec's seccomp profile as a classic BPF program: per rule, the
//! syscall number and argument conditions, first match wins, the default
//! action otherwise; syscalls of other architectures are killed.

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompOperator};

use crate::container::ContainerError;

include!(concat!(env!("OUT_DIR"), "/syscalls.rs"));

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

// Classic BPF opcodes.
const LD_W_ABS: u16 = 0x20;
const JMP_JEQ_K: u16 = 0x15;
const JMP_JGT_K: u16 = 0x25;
const JMP_JGE_K: u16 = 0x35;
const ALU_AND_K: u16 = 0x54;
const RET_K: u16 = 0x06;

// struct seccomp_data offsets.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
const OFFSET_ARGS: u32 = 16;

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

/// A compiled filter and the seccomp(2) flags to load it with.
#[derive(Debug)]
pub struct Filter {
    program: Vec<libc::sock_filter>,
    flags: libc::c_ulong,
}

/// The number of a syscall name, if this architecture has it.
pub fn syscall_number(name: &str) -> Option<u32> {
    SYSCALLS
        .binary_search_by(|(n, _)| n.cmp(&name))
        .ok()
        .map(|i| SYSCALLS[i].1)
}

/// A jump target while assembling: the next rule, or the action of this one.
#[derive(Clone, Copy)]
enum Target {
    Next,
    Fail,
    Match,
}

struct Insn {
    code: u16,
    k: u32,
    jt: Target,
    jf: Target,
}

fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        k,
        jt: Target::Next,
        jf: Target::Next,
    }
}

fn jump(code: u16, k: u32, jt: Target, jf: Target) -> Insn {
    Insn { code, k, jt, jf }
}

fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<u32, ContainerError> {
    let data = errno.unwrap_or(libc::EPERM as u32) & 0xffff;
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => RET_KILL_THREAD,
        LinuxSeccompAction::ScmpActKillProcess => RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => RET_TRAP,
        LinuxSeccompAction::ScmpActErrno => RET_ERRNO | data,
        LinuxSeccompAction::ScmpActTrace => RET_TRACE | data,
        LinuxSeccompAction::ScmpActLog => RET_LOG,
        LinuxSeccompAction::ScmpActAllow => RET_ALLOW,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(ContainerError::InvalidSpec(
                "seccomp action SCMP_ACT_NOTIFY is not supported".into(),
            ))
        }
    })
}

/// Instructions testing one argument condition: fall through when it holds,
/// jump to `Fail` when not.
fn condition(arg: &LinuxSeccompArg) -> Result<Vec<Insn>, ContainerError> {
    if arg.index() > 5 {
        return Err(ContainerError::InvalidSpec(format!(
            "seccomp argument index {} (at most 5)",
            arg.index()
        )));
    }
    let lo_offset = OFFSET_ARGS + 8 * arg.index() as u32;
    let hi_offset = lo_offset + 4;
    let value = arg.value();
    let (hi, lo) = ((value >> 32) as u32, value as u32);
    let load_hi = stmt(LD_W_ABS, hi_offset);
    let load_lo = stmt(LD_W_ABS, lo_offset);
    use Target::{Fail, Next};
    // Jumps are relative: "skip n" is encoded by Target::Next with an offset
    // below, so conditions are written with explicit small skips.
    Ok(match arg.op() {
        LinuxSeccompOperator::ScmpCmpEq => vec![
            load_hi,
            jump(JMP_JEQ_K, hi, Next, Fail),
            load_lo,
            jump(JMP_JEQ_K, lo, Next, Fail),
        ],
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            let expected = arg.value_two().unwrap_or(0);
            vec![
                load_hi,
                stmt(ALU_AND_K, hi),
                jump(JMP_JEQ_K, (expected >> 32) as u32, Next, Fail),
                load_lo,
                stmt(ALU_AND_K, lo),
                jump(JMP_JEQ_K, expected as u32, Next, Fail),
            ]
        }
        // The remaining comparisons go through a skip-encoded sequence.
        op => return compare(op, hi, lo, load_hi, load_lo),
    })
}

/// NE, GT, GE, LT, LE on 64-bit values as two 32-bit halves. Uses Skip
/// targets via the `skip` helper: instruction offsets are fixed here.
fn compare(
    op: LinuxSeccompOperator,
    hi: u32,
    lo: u32,
    load_hi: Insn,
    load_lo: Insn,
) -> Result<Vec<Insn>, ContainerError> {
    use Target::{Fail, Match as Hold};
    // `Hold` in these sequences means "condition holds": continue after the
    // sequence. It is patched to a skip to the end below.
    let seq = match op {
        // hi != H → holds; else lo != L → holds; else fail.
        LinuxSeccompOperator::ScmpCmpNe => vec![
            load_hi,
            jump(JMP_JEQ_K, hi, Target::Next, Hold),
            load_lo,
            jump(JMP_JEQ_K, lo, Fail, Hold),
        ],
        // hi > H → holds; hi == H and lo > L → holds.
        LinuxSeccompOperator::ScmpCmpGt => vec![
            load_hi,
            jump(JMP_JGT_K, hi, Hold, Target::Next),
            jump(JMP_JEQ_K, hi, Target::Next, Fail),
            load_lo,
            jump(JMP_JGT_K, lo, Hold, Fail),
        ],
        LinuxSeccompOperator::ScmpCmpGe => vec![
            load_hi,
            jump(JMP_JGT_K, hi, Hold, Target::Next),
            jump(JMP_JEQ_K, hi, Target::Next, Fail),
            load_lo,
            jump(JMP_JGE_K, lo, Hold, Fail),
        ],
        // a < b  ⇔  !(a >= b)
        LinuxSeccompOperator::ScmpCmpLt => vec![
            load_hi,
            jump(JMP_JGT_K, hi, Fail, Target::Next),
            jump(JMP_JEQ_K, hi, Target::Next, Hold),
            load_lo,
            jump(JMP_JGE_K, lo, Fail, Hold),
        ],
        LinuxSeccompOperator::ScmpCmpLe => vec![
            load_hi,
            jump(JMP_JGT_K, hi, Fail, Target::Next),
            jump(JMP_JEQ_K, hi, Target::Next, Hold),
            load_lo,
            jump(JMP_JGT_K, lo, Fail, Hold),
        ],
        LinuxSeccompOperator::ScmpCmpEq | LinuxSeccompOperator::ScmpCmpMaskedEq => {
            unreachable!("handled by condition()")
        }
    };
    Ok(seq)
}

/// Resolves targets of one condition sequence: `Match` ("holds") jumps to
/// the sequence's end; `Next` is the next instruction; `Fail` stays symbolic.
fn resolve_holds(seq: Vec<Insn>) -> Vec<(Insn, Option<u8>, Option<u8>)> {
    let len = seq.len();
    seq.into_iter()
        .enumerate()
        .map(|(i, insn)| {
            let to_end = (len - i - 1) as u8;
            let fix = |t: Target| match t {
                Target::Match => Some(to_end),
                Target::Next => Some(0),
                Target::Fail => None,
            };
            let (jt, jf) = (fix(insn.jt), fix(insn.jf));
            (insn, jt, jf)
        })
        .collect()
}

fn sock_filter(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Compiles the profile. Unknown syscall names are skipped (as libseccomp
/// and runc do: profiles name syscalls of newer kernels).
pub fn compile(profile: &LinuxSeccomp) -> Result<Filter, ContainerError> {
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut program = vec![
        sock_filter(LD_W_ABS, 0, 0, OFFSET_ARCH),
        sock_filter(JMP_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        sock_filter(RET_K, 0, 0, RET_KILL_PROCESS),
        sock_filter(LD_W_ABS, 0, 0, OFFSET_NR),
        // x32 syscalls take the default action.
        sock_filter(JMP_JGE_K, 0, 1, X32_SYSCALL_BIT),
        sock_filter(RET_K, 0, 0, default),
    ];
    for rule in profile.syscalls().as_deref().unwrap_or_default() {
        let ret = action(rule.action(), rule.errno_ret())?;
        if ret == default {
            continue;
        }
        for name in rule.names() {
            let Some(number) = syscall_number(name) else {
                tracing::debug!("seccomp: skipping unknown syscall {name}");
                continue;
            };
            // Body: conditions, then the action; the rule starts by reloading nr.
            let mut body: Vec<(Insn, Option<u8>, Option<u8>)> = Vec::new();
            for arg in rule.args().as_deref().unwrap_or_default() {
                body.extend(resolve_holds(condition(arg)?));
            }
            let body_len = body.len() + 1; // + RET
            if body_len > 250 {
                return Err(ContainerError::InvalidSpec(format!(
                    "seccomp rule for {name} has too many argument conditions"
                )));
            }
            program.push(sock_filter(LD_W_ABS, 0, 0, OFFSET_NR));
            program.push(sock_filter(JMP_JEQ_K, 0, body_len as u8, number));
            for (i, (insn, jt, jf)) in body.into_iter().enumerate() {
                // Fail = skip to the end of this rule (past its RET).
                let to_next_rule = (body_len - i - 1) as u8;
                program.push(sock_filter(
                    insn.code,
                    jt.unwrap_or(to_next_rule),
                    jf.unwrap_or(to_next_rule),
                    insn.k,
                ));
            }
            program.push(sock_filter(RET_K, 0, 0, ret));
        }
    }
    program.push(sock_filter(RET_K, 0, 0, default));
    if program.len() > 4096 {
        return Err(ContainerError::InvalidSpec(format!(
            "the seccomp profile compiles to {} instructions (the kernel takes 4096)",
            program.len()
        )));
    }
    let mut flags: libc::c_ulong = 0;
    for flag in profile.flags().as_deref().unwrap_or_default() {
        let name = serde_json::to_value(flag)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        flags |= match name.as_str() {
            "SECCOMP_FILTER_FLAG_LOG" => 2,
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => 4,
            "SECCOMP_FILTER_FLAG_TSYNC" => 1,
            other => {
                return Err(ContainerError::InvalidSpec(format!(
                    "unsupported seccomp flag {other}"
                )))
            }
        };
    }
    Ok(Filter { program, flags })
}

/// Loads the filter into this (single-threaded) process.
pub fn install(filter: &Filter) -> Result<(), ContainerError> {
    let prog = libc::sock_fprog {
        len: filter.program.len() as u16,
        filter: filter.program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: seccomp(SET_MODE_FILTER) reads `prog`, which points at our
    // live instruction vector for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            1 as libc::c_ulong, // SECCOMP_SET_MODE_FILTER
            filter.flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(ContainerError::Setup(format!(
            "loading the seccomp filter: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_syscall_table_knows_common_names() {
        assert_eq!(syscall_number("read"), Some(0));
        assert_eq!(syscall_number("write"), Some(1));
        assert_eq!(syscall_number("mkdirat"), Some(258));
        assert_eq!(syscall_number("no_such_syscall"), None);
    }

    #[test]
    fn notify_is_refused_with_a_clear_error() {
        let profile: LinuxSeccomp =
            serde_json::from_str(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#).unwrap();
        let error = compile(&profile).unwrap_err().to_string();
        assert!(error.contains("SCMP_ACT_NOTIFY"), "{error}");
    }

    #[test]
    fn an_unknown_action_does_not_parse() {
        let error = serde_json::from_str::<LinuxSeccomp>(r#"{"defaultAction":"SCMP_ACT_BOGUS"}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("SCMP_ACT_BOGUS"), "{error}");
    }
}
