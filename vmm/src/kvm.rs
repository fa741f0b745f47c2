//! Opening `/dev/kvm`, with errors a person can act on, and recognising PVM.
//!
//! PVM (`kvm_pvm`) is KVM done in software for hosts without VMX/SVM. It runs
//! only guest kernels built with PVM support (`CONFIG_PVM_GUEST`); a normal
//! kernel falls into its instruction emulator, crawls and dies with an opaque
//! "KVM internal error". So we refuse that combination up front.

use std::path::{Path, PathBuf};

use kvm_ioctls::Kvm;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("{path} does not exist: KVM is not available on this machine (enable VMX/SVM and load kvm_intel or kvm_amd)")]
    Missing { path: PathBuf },
    #[error(
        "no permission to open {path}: run as root or join the group that owns it (usually 'kvm')"
    )]
    PermissionDenied { path: PathBuf },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is PVM (module kvm_pvm: KVM without VMX/SVM), which runs only PVM-enabled guest kernels, \
         and {kernel} has no PVM support. Pass --kernel with a guest kernel built with CONFIG_PVM_GUEST, \
         or run on a host with VMX/SVM"
    )]
    PvmNeedsPvmKernel { path: PathBuf, kernel: PathBuf },
}

/// Where the KVM device is; `MICROVM_KVM_DEVICE` overrides it (for tests of
/// the error paths).
pub fn device_path() -> PathBuf {
    std::env::var_os("MICROVM_KVM_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"))
}

pub fn open(path: &Path) -> Result<Kvm, KvmError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| KvmError::Missing {
            path: path.to_path_buf(),
        })?;
    Kvm::new_with_path(&c_path).map_err(|e| {
        let path = path.to_path_buf();
        match e.errno() {
            libc::ENOENT => KvmError::Missing { path },
            libc::EACCES | libc::EPERM => KvmError::PermissionDenied { path },
            _ => KvmError::Open {
                path,
                source: std::io::Error::from_raw_os_error(e.errno()),
            },
        }
    })
}

/// True when the KVM in use is PVM.
pub fn is_pvm(sys_module: &Path) -> bool {
    sys_module.join("kvm_pvm").exists()
}

/// Whether a vmlinux was built with PVM guest support: such kernels carry
/// `pvm_*` symbols and strings; others have none.
pub fn kernel_supports_pvm(kernel: &Path) -> std::io::Result<bool> {
    let bytes = std::fs::read(kernel)?;
    Ok(bytes.windows(4).any(|w| w == b"pvm_"))
}

/// Refuses a PVM host with a kernel that cannot run there.
pub fn check_kernel_for_host(
    kvm_path: &Path,
    sys_module: &Path,
    kernel: &Path,
) -> Result<(), KvmError> {
    if is_pvm(sys_module) && !kernel_supports_pvm(kernel).unwrap_or(true) {
        return Err(KvmError::PvmNeedsPvmKernel {
            path: kvm_path.to_path_buf(),
            kernel: kernel.to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_named() {
        let err = open(Path::new("/nonexistent/kvm")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/kvm does not exist"), "{err}");
    }

    #[test]
    fn pvm_host_needs_a_pvm_kernel() {
        let dir = std::env::temp_dir().join(format!("pvm-check-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("module/kvm_pvm")).unwrap();
        std::fs::create_dir_all(dir.join("plain")).unwrap();
        let plain = dir.join("vmlinux-plain");
        let pvm = dir.join("vmlinux-pvm");
        std::fs::write(&plain, b"\x7fELF kernel without it").unwrap();
        std::fs::write(&pvm, b"\x7fELF ... pvm_early_setup ...").unwrap();
        let kvm = Path::new("/dev/kvm");
        let err = check_kernel_for_host(kvm, &dir.join("module"), &plain)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("PVM") && err.contains("vmlinux-plain"),
            "{err}"
        );
        check_kernel_for_host(kvm, &dir.join("module"), &pvm).unwrap();
        check_kernel_for_host(kvm, &dir.join("plain"), &plain).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
