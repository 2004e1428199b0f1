//! Mapping the `redis` crate's errors to [`BackendError`]s.

use std::time::Duration;

use ::redis::{ErrorKind, RedisError, ServerErrorKind};
use tokio::time::Instant;

use super::url::{redact, short_redis_error};
use crate::error::BackendError;

/// Server error codes that mean "cannot serve now" rather than "bad request".
fn is_unavailable_code(code: &str) -> bool {
    matches!(
        code,
        "LOADING"
            | "MASTERDOWN"
            | "CLUSTERDOWN"
            | "TRYAGAIN"
            | "READONLY"
            | "OOM"
            | "BUSY"
            | "NOAUTH"
            | "WRONGPASS"
            | "MISCONF"
    )
}

/// Maps a `redis` crate error on an operation about `key` to a
/// [`BackendError`].
pub(super) fn map_error(key: &str, e: &RedisError, elapsed: Duration) -> BackendError {
    if e.kind() == ErrorKind::InvalidClientConfig {
        return BackendError::invalid_config(format!("Redis: {}", short_redis_error(e)));
    }
    if is_limit_error(e) {
        return BackendError::protocol(key, short_redis_error(e));
    }
    if e.is_timeout() {
        return BackendError::TimedOut {
            key: key.to_owned(),
            after: elapsed,
        };
    }
    let unavailable = match e.kind() {
        // A reply that does not parse is, in practice, a stream cut in the
        // middle of a reply; the crate replaces the connection.
        ErrorKind::Parse
        | ErrorKind::Io
        | ErrorKind::AuthenticationFailed
        | ErrorKind::ClusterConnectionNotFound
        | ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask,
        ) => true,
        _ => e.code().is_some_and(is_unavailable_code),
    };
    if unavailable {
        BackendError::unavailable(key, e)
    } else {
        BackendError::protocol(key, e)
    }
}

/// Whether the connection was dropped because a reply went over the
/// limits of [`Limited`](super::limit::Limited).
pub(super) fn is_limit_error(e: &RedisError) -> bool {
    e.is_io_error() && e.to_string().contains(super::limit::LIMIT_ERROR)
}

/// Whether a connect failed because the server does not speak RESP3.
pub(super) fn lacks_resp3(e: &RedisError) -> bool {
    e.kind() == ErrorKind::RESP3NotSupported
        || e.code() == Some("NOPROTO")
        || (e.code() == Some("ERR") && e.detail().is_some_and(|d| d.contains("unknown command")))
}

pub(super) fn finish_connect_error(
    url: &str,
    e: Result<RedisError, BackendError>,
    started: Instant,
) -> BackendError {
    match e {
        Ok(e) => connect_error(url, e, started.elapsed()),
        Err(e) => e,
    }
}

/// Says which server a failed first command was sent to.
pub(super) fn connect_failed(url: &str, e: BackendError) -> BackendError {
    match e {
        BackendError::Unavailable { reason, .. } => BackendError::connect(redact(url), reason),
        BackendError::TimedOut { after, .. } => {
            BackendError::connect(redact(url), format!("no answer within {after:?}"))
        }
        other => other,
    }
}

pub(super) fn connect_error(url: &str, e: RedisError, elapsed: Duration) -> BackendError {
    if e.kind() == ErrorKind::InvalidClientConfig {
        return BackendError::invalid_config(format!(
            "Redis at {}: {}",
            redact(url),
            short_redis_error(&e)
        ));
    }
    match map_error("", &e, elapsed) {
        BackendError::TimedOut { after, .. } => {
            BackendError::connect(redact(url), format!("no answer within {after:?}"))
        }
        // A server that answers the handshake with an error (wrong password,
        // no such database) cannot serve us either.
        _ => BackendError::connect(redact(url), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_back_to_resp2_only_when_resp3_is_missing() {
        let missing = RedisError::from((ErrorKind::RESP3NotSupported, "no HELLO"));
        assert!(lacks_resp3(&missing));
        let unknown = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "An error was signalled by the server",
            "unknown command 'HELLO'".to_owned(),
        ));
        assert!(lacks_resp3(&unknown));
        let noproto = ::redis::make_extension_error("NOPROTO".into(), Some("unsupported".into()));
        assert!(lacks_resp3(&noproto));
        let noauth = ::redis::make_extension_error(
            "NOAUTH".into(),
            Some("HELLO must be called with the client already authenticated".into()),
        );
        assert!(!lacks_resp3(&noauth));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!lacks_resp3(&io));
    }
}
