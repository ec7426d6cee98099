//! SIGINT and SIGTERM for the commands that run to completion (`spark serve` shuts down on its
//! own runtime). Owns one rule: a signal never leaves spark's work directories behind.
//!
//! [`on_interrupt`] installs handlers for the life of the process and runs a callback once on
//! the first signal, on its own thread: `calibrate` and `validate` set a flag and finish with a
//! partial report; every other command ([`exit_on_interrupt`]) removes its work directories and
//! exits with [`crate::exit::INTERRUPTED`], its children going with it (they die with spark).

use std::io;

/// Runs `f` once, on a thread of its own, when SIGINT or SIGTERM arrives.
pub fn on_interrupt(f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut int, mut term) = rt.block_on(async {
        Ok::<_, io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    std::thread::Builder::new()
        .name("spark-signals".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
            f();
        })?;
    Ok(())
}

/// On SIGINT or SIGTERM: one log line, the work directories removed, exit 130.
pub fn exit_on_interrupt() -> io::Result<()> {
    on_interrupt(|| {
        tracing::warn!("interrupted: removing work directories and stopping");
        crate::atomic_file::remove_work_dirs();
        std::process::exit(crate::exit::INTERRUPTED)
    })
}
