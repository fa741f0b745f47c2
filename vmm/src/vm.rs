//! Building and running one microVM: memory, boot state, devices, vCPU
//! threads and the device event loop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;

use event_manager::{MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{mptable, regs, ArchError};
use crate::boot::{self, BootError};
use crate::devices::bus::Bus;
use crate::devices::i8042::I8042;
use crate::devices::manager::{AttachError, EventLoop, MmioDevices};
use crate::devices::serial::SerialConsole;
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::net::{Net, NetConfig, TapSource};
use crate::devices::virtio::vsock::Vsock;
use crate::jail::{self, ThreadKind};
use crate::kvm::{self, KvmError};
use crate::layout;
use crate::logger::{Capped, MAX_CONSOLE_BYTES};
use crate::memory::create_guest_memory;
use crate::vcpu::{self, ExitSignal, VmExit};

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// Discarded; the guest is told to be quiet, which also keeps boot fast.
    Off,
    Stdout,
    File(PathBuf),
}

/// Everything needed to start a microVM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cpus: u8,
    pub memory_mib: u32,
    /// Appended to the built-in kernel command line.
    pub extra_cmdline: String,
    pub console: Console,
    /// Hybrid vsock: the host Unix socket bridged to the guest's vsock.
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares: host directories the guest mounts by tag.
    pub fs: Vec<FsConfig>,
    /// virtio-net NICs, each on a host tap (eth0, eth1, … in this order).
    pub net: Vec<NetConfig>,
}

#[derive(Debug, Clone)]
pub struct FsConfig {
    pub tag: String,
    pub dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// Where the host connects (listened on before the jail is entered).
    pub uds_path: PathBuf,
    /// Where guest connections to host port P go, as `<path>_P`:
    /// `uds_path` unless the jail moved the socket's directory.
    pub host_ports_path: Option<PathBuf>,
}

/// The guest always gets: the serial console, resets through the i8042
/// (`reboot=k`) and on panic (`panic=-1`), no probing of absent hardware,
/// and `noreplace-smp`: a kernel booting on one CPU otherwise rewrites every
/// `lock` prefix in its text to a no-op, one `text_poke` (page-table switch
/// and TLB flush) each — thousands per boot, 0.1-0.7 s of a 1-vCPU guest's
/// start under nested virtualisation (sampled), to save a few cycles per
/// atomic operation. Guests with more vCPUs keep their prefixes anyway.
const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd noreplace-smp";

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("{0} vCPUs requested: give 1 to {max}", max = mptable::MAX_CPUS)]
    BadCpuCount(u8),
    #[error("{0} MiB of memory requested: give at least 16")]
    BadMemorySize(u32),
    #[error("setting up {mib} MiB of guest memory")]
    Memory {
        mib: u32,
        source: crate::memory::MemoryError,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error("KVM refused {what}")]
    KvmSetup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("setting up {what}")]
    Device {
        what: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("virtio-net NIC {index}")]
    Net {
        index: usize,
        #[source]
        error: crate::devices::virtio::net::NetError,
    },
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("tap fd {0} is given to more than one NIC")]
    DuplicateTapFd(i32),
    #[error("cannot open console file {path}")]
    ConsoleFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn kvm_setup(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmSetup { what, source }
}

fn device_err<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> VmError {
    move |source| VmError::Device {
        what,
        source: Box::new(source),
    }
}

/// Each inherited tap fd is owned (and closed) by one device only.
fn check_net_fds(nics: &[NetConfig]) -> Result<(), VmError> {
    let mut seen = std::collections::HashSet::new();
    for nic in nics {
        if let TapSource::Fd(fd) = nic.tap {
            if !seen.insert(fd) {
                return Err(VmError::DuplicateTapFd(fd));
            }
        }
    }
    Ok(())
}

fn console_writer(console: &Console) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match console {
        Console::Off => Box::new(std::io::sink()),
        Console::Stdout => Box::new(std::io::stdout()),
        // The guest writes what it likes to its console: the file is capped.
        Console::File(path) => Box::new(Capped::new(
            std::fs::File::create(path).map_err(|source| VmError::ConsoleFile {
                path: path.clone(),
                source,
            })?,
            MAX_CONSOLE_BYTES,
            "the console file",
        )),
    })
}

/// A VM ready to run.
pub struct Vm {
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    events: EventLoop,
    reset: EventFd,
    /// Kept alive: KVM's memory slots point into it.
    _memory: GuestMemoryMmap,
    _vm: VmFd,
    vsock_path: Option<PathBuf>,
}

impl Vm {
    pub fn build(config: &VmConfig) -> Result<Vm, VmError> {
        if config.cpus == 0 || config.cpus > mptable::MAX_CPUS {
            return Err(VmError::BadCpuCount(config.cpus));
        }
        if config.memory_mib < 16 {
            return Err(VmError::BadMemorySize(config.memory_mib));
        }
        // Bad paths are named before KVM is touched.
        if !config.kernel.is_file() {
            return Err(BootError::OpenKernel {
                path: config.kernel.clone(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            }
            .into());
        }
        if let Some(initrd) = config.initrd.as_ref().filter(|p| !p.is_file()) {
            return Err(BootError::ReadInitrd {
                path: initrd.clone(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            }
            .into());
        }
        // So are bad taps: the NICs take their taps now.
        check_net_fds(&config.net)?;
        let nics = config
            .net
            .iter()
            .enumerate()
            .map(|(index, nic)| Net::new(nic).map_err(|error| VmError::Net { index, error }))
            .collect::<Result<Vec<_>, _>>()?;
        let started = std::time::Instant::now();
        let phase = |what: &str| tracing::debug!("{what} after {:?}", started.elapsed());
        let kvm_path = kvm::device_path();
        let kvm = kvm::open(&kvm_path)?;
        kvm::check_kernel_for_host(&kvm_path, Path::new("/sys/module"), &config.kernel)?;
        let vm = kvm.create_vm().map_err(kvm_setup("creating the VM"))?;
        vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(kvm_setup("placing the TSS"))?;
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_setup("placing the identity map"))?;
        vm.create_irq_chip()
            .map_err(kvm_setup("creating the interrupt controllers"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_setup("creating the PIT"))?;
        phase("VM created");

        let memory =
            create_guest_memory(&vm, &layout::ram_ranges(u64::from(config.memory_mib) << 20))
                .map_err(|source| VmError::Memory {
                    mib: config.memory_mib,
                    source,
                })?;
        phase("guest memory mapped");
        let kernel = boot::load_kernel(&memory, &config.kernel)?;
        phase("kernel loaded");
        let initrd = match &config.initrd {
            Some(path) => Some(boot::load_initrd(&memory, path, kernel.end)?),
            None => None,
        };
        phase("initrd loaded");

        let exit = Arc::new(ExitSignal::new().map_err(device_err("the exit event"))?);
        let mut pio = Bus::default();
        let mut mmio = Bus::default();
        let mut events = EventLoop::new().map_err(|e| VmError::Device {
            what: "the event loop",
            source: format!("{e:?}").into(),
        })?;

        // Serial console on COM1.
        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(device_err("the serial interrupt"))?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_COM1_IRQ)
            .map_err(kvm_setup("wiring the serial interrupt"))?;
        let serial = SerialConsole::new(serial_irq, console_writer(&config.console)?);
        pio.insert(
            layout::SERIAL_COM1_PORT as u64,
            8,
            Arc::new(Mutex::new(serial)),
        )
        .map_err(device_err("the serial port"))?;

        // i8042: its reset ends the VM.
        let reset = EventFd::new(libc::EFD_NONBLOCK).map_err(device_err("the reset event"))?;
        let i8042 = I8042::new(reset.try_clone().map_err(device_err("the reset event"))?);
        let i8042_len = (layout::I8042_COMMAND_PORT - layout::I8042_DATA_PORT + 1) as u64;
        pio.insert(
            layout::I8042_DATA_PORT as u64,
            i8042_len,
            Arc::new(Mutex::new(i8042)),
        )
        .map_err(device_err("the i8042"))?;

        let mut cmdline = BASE_CMDLINE.to_string();
        if config.console == Console::Off {
            cmdline.push_str(" quiet");
        }

        // virtio-mmio devices, in this order (the guest numbers them so).
        let mut devices = MmioDevices::new(&vm, &memory);
        let mut vsock_path = None;
        if let Some(vsock) = &config.vsock {
            let mut device = Vsock::new(vsock.guest_cid, vsock.uds_path.clone())
                .map_err(device_err("the vsock device"))?;
            if let Some(path) = &vsock.host_ports_path {
                device.set_host_ports_path(path.clone());
            }
            devices.attach_polled("vsock", device, &mut mmio, &mut events)?;
            vsock_path = Some(vsock.uds_path.clone());
        }
        if !config.fs.is_empty() {
            // The passthrough file system holds a descriptor per inode in use.
            match crate::devices::virtio::fs::server::raise_fd_limit() {
                Ok(limit) => tracing::debug!("virtio-fs: up to {limit} open files"),
                Err(e) => tracing::warn!("virtio-fs: raising the open-file limit: {e}"),
            }
        }
        for share in &config.fs {
            let device = Fs::new(&share.tag, &share.dir).map_err(|e| VmError::Device {
                what: "the virtio-fs device",
                source: Box::new(e),
            })?;
            devices.attach_threaded("virtio-fs", device, &mut mmio)?;
        }
        for (index, device) in nics.into_iter().enumerate() {
            tracing::debug!("virtio-net: NIC {index} on tap {}", device.tap_name());
            devices.attach_polled("virtio-net", device, &mut mmio, &mut events)?;
        }
        for fragment in devices.cmdline() {
            cmdline.push(' ');
            cmdline.push_str(&fragment);
        }

        if !config.extra_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&config.extra_cmdline);
        }
        boot::write_boot_params(&memory, &cmdline, initrd)?;
        regs::write_boot_tables(&memory)?;
        mptable::write(&memory, config.cpus)?;

        let vcpus = (0..config.cpus)
            .map(|index| vcpu::create(&kvm, &vm, index, config.cpus, kernel.entry.raw_value()))
            .collect::<Result<Vec<_>, _>>()?;
        phase("devices and vCPUs ready");
        tracing::debug!("kernel command line: {cmdline}");
        Ok(Vm {
            vcpus,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            exit,
            events,
            reset,
            _memory: memory,
            _vm: vm,
            vsock_path,
        })
    }

    /// Runs the guest until it stops. Returns why it stopped.
    pub fn run(self) -> VmExit {
        let Vm {
            vcpus,
            pio,
            mmio,
            exit,
            mut events,
            reset,
            _memory,
            _vm,
            vsock_path,
        } = self;
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let (pio, mmio, exit) = (pio.clone(), mmio.clone(), exit.clone());
            let spawned = thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    if let Err(e) = jail::confine_thread(ThreadKind::Vcpu) {
                        exit.signal(VmExit::Failed(protocols::error_chain(&e)));
                        return;
                    }
                    tracing::debug!(
                        "startup: vcpu{index} enters the guest at {:.1} ms",
                        crate::startup_ms()
                    );
                    vcpu::run(vcpu, index as u8, pio, mmio, exit)
                });
            if let Err(e) = spawned {
                return VmExit::Failed(format!("starting vCPU thread {index}: {e}"));
            }
        }
        // The i8042 reset and the event loop run on one thread.
        let reset_exit = exit.clone();
        let spawned = thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                if let Err(e) = jail::confine_thread(ThreadKind::Devices) {
                    reset_exit.signal(VmExit::Failed(protocols::error_chain(&e)));
                    return;
                }
                events.add_subscriber(Arc::new(Mutex::new(ResetWatcher {
                    reset,
                    exit: reset_exit,
                })));
                loop {
                    if let Err(e) = events.run() {
                        tracing::error!("device event loop: {e:?}");
                    }
                    jail::test_violation(ThreadKind::Devices);
                }
            });
        if let Err(e) = spawned {
            return VmExit::Failed(format!("starting the device thread: {e}"));
        }
        if let Err(e) = jail::confine_thread(ThreadKind::Main) {
            return VmExit::Failed(protocols::error_chain(&e));
        }
        if let Some(due) = jail::test_violation_due(ThreadKind::Main) {
            exit.wait_for(due);
            jail::test_violation(ThreadKind::Main);
        }
        let result = exit.wait();
        if let Some(path) = vsock_path {
            let _ = std::fs::remove_file(path);
        }
        result
    }
}

/// Turns the i8042's reset into the end of the VM.
struct ResetWatcher {
    reset: EventFd,
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for ResetWatcher {
    fn process(&mut self, _events: event_manager::Events, _ops: &mut event_manager::EventOps) {
        let _ = self.reset.read();
        self.exit
            .signal(VmExit::GuestStopped("reset through the i8042".into()));
    }

    fn init(&mut self, ops: &mut event_manager::EventOps) {
        if let Err(e) = ops.add(event_manager::Events::new(
            &self.reset,
            event_manager::EventSet::IN,
        )) {
            tracing::error!("watching the reset event: {e:?}");
        }
    }
}
