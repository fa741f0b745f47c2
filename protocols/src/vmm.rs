//! What the runtime and the VMM (`microvm-vmm`) agree on beyond the agent
//! API: values of the VMM's command line.

/// What the VMM's seccomp filters do with a system call outside a thread's
/// list (`microvm-vmm --seccomp`, the runtime's `[hypervisor] seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Seccomp {
    /// The whole VMM is killed (the default).
    #[default]
    On,
    /// The kernel logs the call (audit type 1326) and lets it through: for
    /// measuring the lists, never for production.
    Log,
    /// No filter at all (debugging only; the VMM and runtime warn).
    Off,
}

impl std::str::FromStr for Seccomp {
    type Err = String;
    fn from_str(text: &str) -> Result<Seccomp, String> {
        match text {
            "on" | "kill" | "1" | "true" => Ok(Seccomp::On),
            "log" => Ok(Seccomp::Log),
            "off" | "0" | "false" => Ok(Seccomp::Off),
            other => Err(format!("seccomp {other:?}: give on, off or log")),
        }
    }
}

impl Seccomp {
    /// The VMM's `--seccomp` value.
    pub fn as_arg(self) -> &'static str {
        match self {
            Seccomp::On => "on",
            Seccomp::Log => "log",
            Seccomp::Off => "off",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seccomp_values_round_trip() {
        for mode in [Seccomp::On, Seccomp::Log, Seccomp::Off] {
            assert_eq!(mode.as_arg().parse::<Seccomp>(), Ok(mode));
        }
        assert_eq!("kill".parse::<Seccomp>(), Ok(Seccomp::On));
        assert!("maybe".parse::<Seccomp>().unwrap_err().contains("maybe"));
    }
}
