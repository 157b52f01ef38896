//! Process signals every onceonly server handles the same way: Ctrl-C or
//! SIGTERM to shut down gracefully, SIGHUP to reload files in place.

/// Completes on Ctrl-C or SIGTERM. The handlers are installed when this
/// is called, not when the future is first polled: call it before saying
/// the server is ready, so that a SIGTERM right after that line (a service
/// manager, a test) stops the server rather than killing the process with
/// the signal's default action. Call within a tokio runtime.
pub fn terminate_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let (terminate, interrupt) = {
        use tokio::signal::unix::{SignalKind, signal};
        // SIGHUP too: its default action ends the process, and the reload
        // handler may be installed a moment after the ready line. Once
        // tokio handles a signal it does so for the life of the process,
        // so an early SIGHUP is only missed, never fatal.
        drop(signal(SignalKind::hangup()));
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |signal: Option<tokio::signal::unix::Signal>| async move {
                match signal {
                    Some(mut signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(terminate) => {},
                () = wait(interrupt) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs `reload` on every SIGHUP, in a background task (not on other
/// platforms), until the returned guard is dropped.
///
/// The guard is the point: a task that lives as long as the process keeps
/// whatever its closure holds alive as long, and a server that waits for
/// its last handle (the broker's audit writer does) would then never exit.
/// Drop the guard when serving ends, and let the closure hold weak
/// references where it can.
#[must_use = "the SIGHUP handler stops when the guard is dropped"]
pub fn on_sighup(reload: impl Fn() + Send + 'static) -> SighupGuard {
    // Installed now, not when the task first runs.
    #[cfg(unix)]
    let task = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .ok()
        .map(|mut hangups| {
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    reload();
                }
            })
        });
    #[cfg(not(unix))]
    let task = {
        drop(reload);
        None
    };
    SighupGuard { task }
}

/// Stops the SIGHUP handler of [`on_sighup`] (and drops its closure) when
/// dropped.
#[derive(Debug)]
pub struct SighupGuard {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for SighupGuard {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
