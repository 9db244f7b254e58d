//! The XDP program's log records (aya-log), forwarded into the daemon's log.

use crate::dataplane::Dataplane;

/// The program's records, as the daemon's own log events (target `bpf`). The kernel
/// already filtered them by level (`SHAPER_BPF_LOG`), so all of them are forwarded.
struct BpfLog;

impl log::Log for BpfLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let msg = r.args();
        match r.level() {
            log::Level::Error => tracing::error!(target: "bpf", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "bpf", "{msg}"),
            // Records that reached here were asked for: show them at info and below.
            _ => tracing::info!(target: "bpf", level = %r.level(), "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Forward the XDP program's log records (aya-log) into the daemon's log.
pub fn forward(dp: &mut Dataplane, iface: &str) {
    let logger = match aya_log::EbpfLogger::init_with_logger(&mut dp.ebpf, &BpfLog as &dyn log::Log)
    {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(iface, error = %e, "the program's log records are not forwarded");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd for as long as it lives, and the
    // AsyncFd owns the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(iface, error = %e, "the program's log records are not forwarded");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
