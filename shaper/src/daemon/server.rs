//! The control socket's server end: root peers only, one reply per request (the
//! protocol is [`crate::protocol`]).

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::{report, state::State};
use crate::protocol::{self, Envelope, PolicyView, Request, Response};

/// Bind the control socket, mode 0600. A missing directory is made with mode 0700; an
/// existing one is left as it is (`--socket /tmp/s.sock` must not change `/tmp`): the
/// daemon checks every peer's credentials anyway. A live socket means another daemon
/// is running, and anything at the path that is not a socket is not ours: refuse both.
pub fn listen(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another shaper daemon is serving {}; stop it first (or use --socket)",
                    path.display()
                );
            }
            // A socket nobody serves: a daemon that died left it.
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "--socket: {} exists and is not a socket; choose another path (or remove it)",
            path.display()
        ),
        Err(_) => {}
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serve one control connection: root peers only; every bad frame gets an error reply.
pub async fn serve(stream: UnixStream, state: Arc<Mutex<State>>) {
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(protocol::MAX_FRAME)
        .new_codec();
    let mut framed = Framed::new(stream, codec);
    if uid != Some(0) {
        tracing::warn!(?uid, "control socket: refused a non-root peer");
        let _ = send(
            &mut framed,
            &error("permission denied: the control socket serves root only (run as root)"),
        )
        .await;
        return;
    }
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), framed.next()).await;
        let frame = match next {
            Err(_) | Ok(None) => return,
            Ok(Some(Err(e))) => {
                let _ = send(&mut framed, &error(&format!("bad frame: {e}"))).await;
                return;
            }
            Ok(Some(Ok(f))) => f,
        };
        let reply = match serde_json::from_slice::<Envelope<Request>>(&frame) {
            Err(e) => error(&format!("malformed request: {e}")),
            Ok(env) if env.version != protocol::PROTOCOL => error(&format!(
                "protocol version {} is not supported (this daemon speaks {})",
                env.version,
                protocol::PROTOCOL
            )),
            Ok(env) => handle(&state, env.body),
        };
        if send(&mut framed, &reply).await.is_err() {
            return;
        }
    }
}

fn error(message: &str) -> Response {
    Response::Error {
        message: message.to_string(),
    }
}

async fn send(framed: &mut Framed<UnixStream, LengthDelimitedCodec>, r: &Response) -> Result<()> {
    let body = serde_json::to_vec(r)?;
    framed.send(bytes::Bytes::from(body)).await?;
    Ok(())
}

fn handle(state: &Arc<Mutex<State>>, req: Request) -> Response {
    let Ok(mut s) = state.lock() else {
        return error("internal error: state lock poisoned");
    };
    match req {
        Request::Status => Response::Status(report::status(&s)),
        Request::Stats => Response::Stats(report::stats(&mut s)),
        Request::PolicyShow => Response::Policy(PolicyView {
            generation: s.generation,
            hash: s.hash.clone(),
            source: s.source.clone(),
            policy: serde_json::to_value(&s.policy).unwrap_or_default(),
        }),
        Request::PolicyApply {
            file,
            text,
            ssh_client,
            force,
        } => match s.apply(&file, &text, ssh_client.as_deref(), force) {
            Ok((generation, hash)) => {
                tracing::info!(generation, hash = %hash, file, "policy applied");
                Response::Applied { generation, hash }
            }
            Err(e) => error(&e.to_string()),
        },
        Request::Top { n, rule } => Response::Top {
            groups: report::top(&mut s, n as usize, rule.as_deref()),
        },
        Request::Reload => {
            drop(s);
            match super::state::reload(state, "requested") {
                Ok((generation, hash)) => Response::Applied { generation, hash },
                Err(e) => error(&e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::listen;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("shaper-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    #[test]
    fn an_existing_directory_keeps_its_mode() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        let _in_rt = rt.enter();
        let d = scratch("sock-mode");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let sock = d.join("s.sock");
        let l = listen(&sock).expect("listen");
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o755);
        assert_eq!(mode(&sock), 0o600);
        // A missing directory is made, private.
        let deeper = d.join("run/shaper/s.sock");
        let l2 = listen(&deeper).expect("listen in a new directory");
        assert_eq!(mode(&d.join("run/shaper")), 0o700);
        // A second daemon on a live socket is refused.
        let again = listen(&sock).expect_err("a live socket");
        assert!(
            again.to_string().contains("another shaper daemon"),
            "{again}"
        );
        drop((l, l2));
        // A stale socket (nobody serving it) is replaced.
        listen(&sock).expect("a stale socket is replaced");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_path_that_is_not_a_socket_is_left_alone() {
        let d = scratch("sock-file");
        let f = d.join("important.txt");
        std::fs::write(&f, "keep me").expect("write");
        let e = listen(&f).expect_err("a regular file");
        assert!(e.to_string().starts_with("--socket: "), "{e}");
        assert_eq!(std::fs::read_to_string(&f).expect("still there"), "keep me");
        let _ = std::fs::remove_dir_all(&d);
    }
}
