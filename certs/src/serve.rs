//! Process signals every onceonly server handles the same way: Ctrl-C or
//! SIGTERM to shut down gracefully, SIGHUP to reload files in place.

/// Completes on Ctrl-C or SIGTERM.
pub async fn terminate_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
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
    #[cfg(unix)]
    let task = Some(tokio::spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hangups.recv().await.is_some() {
            reload();
        }
    }));
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
