//! Redis URLs: checking them, masking their passwords for messages, and
//! turning them into the `redis` crate's connection settings.

use std::fmt;
use std::sync::Once;

use ::redis::io::tcp::TcpSettings;
use ::redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError};

use crate::error::{BackendError, BackendResult};

/// Checks a Redis URL without connecting.
///
/// Accepted: `redis://[user][:password@]host[:port][/db]`, `rediss://...`
/// (TLS), and `redis+unix:///path/to/socket[?db=N&user=U&pass=P]` (also
/// `unix://`, and the `valkey` spellings the `redis` crate accepts).
///
/// # Errors
///
/// [`BackendError::InvalidUrl`] whose reason says what is wrong with the URL
/// (with any password in it masked).
pub fn check_url(url: &str) -> BackendResult<()> {
    parse_url(url).map(|_| ())
}

pub(super) use crate::backend::url::redact;

pub(super) fn bad_url(url: &str, why: impl fmt::Display) -> BackendError {
    BackendError::InvalidUrl {
        url: redact(url).to_string(),
        reason: why.to_string(),
    }
}

/// Parses and checks a URL into the `redis` crate's connection info.
pub(super) fn parse_url(url: &str) -> BackendResult<ConnectionInfo> {
    let Some((scheme, _)) = url.split_once("://") else {
        return Err(bad_url(
            url,
            "not a URL; expected redis://host:port, rediss://host:port or redis+unix:///path",
        ));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "redis" | "rediss" | "redis+unix" | "unix" | "valkey" | "valkeys" | "valkey+unix" => {}
        other => {
            return Err(bad_url(
                url,
                format_args!(
                    "unsupported scheme {other:?}; expected redis://, rediss:// or redis+unix://"
                ),
            ));
        }
    }
    // The `redis` crate wants the scheme in lower case.
    let lowered = format!(
        "{}{}",
        scheme.to_ascii_lowercase(),
        url.get(scheme.len()..).unwrap_or_default()
    );
    let info = lowered.as_str().into_connection_info().map_err(|e| {
        let why = short_redis_error(&e);
        if why.contains("URL fragment") {
            bad_url(url, "URL fragments (#...) are not supported")
        } else if why.contains("did not parse") {
            bad_url(
                url,
                "it does not parse as a URL (check the host, the port (1-65535) and the \
                 percent-encoding of the user and password)",
            )
        } else {
            bad_url(url, why)
        }
    })?;
    if let ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
        return Err(bad_url(
            url,
            "#insecure (TLS without certificate checks) is not supported",
        ));
    }
    if let ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } = info.addr()
        && host.is_empty()
    {
        return Err(bad_url(url, "the host is missing"));
    }
    if info.redis_settings().db() < 0 {
        return Err(bad_url(url, "the database number must not be negative"));
    }
    Ok(info)
}

/// The crate's description of a configuration error, without the name of
/// its error kind.
pub(super) fn short_redis_error(e: &RedisError) -> String {
    e.to_string().replace(" - InvalidClientConfig", "")
}

/// Installs rustls's `ring` crypto provider as the process default, once.
/// Another provider installed first (by the application) is kept.
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if rustls::crypto::ring::default_provider()
            .install_default()
            .is_err()
        {
            tracing::debug!("a rustls crypto provider was already installed; keeping it");
        }
    });
}

pub(super) fn prepare(info: ConnectionInfo) -> ConnectionInfo {
    if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
        install_crypto_provider();
    }
    info.set_tcp_settings(TcpSettings::default().set_nodelay(true))
}

/// Whether the URL chooses the protocol itself (`?protocol=resp2|resp3`).
pub(super) fn protocol_in_url(url: &str) -> bool {
    url.split_once('?')
        .is_some_and(|(_, query)| query.split('&').any(|p| p.starts_with("protocol=")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_case_insensitive() {
        let info = parse_url("REDIS://127.0.0.1:7000/3").unwrap();
        assert_eq!(info.redis_settings().db(), 3);
        assert!(parse_url("Redis+Unix:///run/redis.sock").is_ok());
    }

    #[test]
    fn parses_url_parts() {
        let info = parse_url("redis://alice:pw@127.0.0.1:7000/3").unwrap();
        assert_eq!(info.redis_settings().db(), 3);
        assert_eq!(info.redis_settings().username(), Some("alice"));
        assert_eq!(info.redis_settings().password(), Some("pw"));
        assert!(matches!(info.addr(), ConnectionAddr::Tcp(h, 7000) if h == "127.0.0.1"));

        let info = parse_url("rediss://cache.example:6380").unwrap();
        assert!(
            matches!(info.addr(), ConnectionAddr::TcpTls { host, port: 6380, insecure: false, .. } if host == "cache.example")
        );

        let info = parse_url("redis+unix:///run/redis.sock?db=2").unwrap();
        assert_eq!(info.redis_settings().db(), 2);
        assert!(
            matches!(info.addr(), ConnectionAddr::Unix(p) if p.as_os_str() == "/run/redis.sock")
        );
    }

    proptest::proptest! {
        #[test]
        fn url_checks_never_panic(url in "\\PC{0,60}") {
            let _ = check_url(&url);
            let _ = redact(&url);
        }

        #[test]
        fn url_errors_never_show_the_password(
            user in "[a-z]{0,8}",
            password in "[A-Za-z0-9]{12,20}",
            rest in "(:[0-9]{1,6})?(/[a-z0-9-]{0,4})?(\\?[a-z]{1,6}=[a-z0-9]{0,4})?",
        ) {
            let url = format!("redis://{user}:{password}@127.0.0.1{rest}");
            if let Err(e) = check_url(&url) {
                proptest::prop_assert!(!e.to_string().contains(&password), "{e}");
            }
            proptest::prop_assert!(!redact(&url).contains(&password));
            let unix = format!("redis+unix:///tmp/r.sock?db={rest}&pass={password}");
            if let Err(e) = check_url(&unix) {
                proptest::prop_assert!(!e.to_string().contains(&password), "{e}");
            }
        }
    }

    #[test]
    fn sees_the_protocol_in_the_url() {
        assert!(protocol_in_url("redis://h/?protocol=resp2"));
        assert!(protocol_in_url("redis+unix:///s?db=1&protocol=3"));
        assert!(!protocol_in_url("redis://h/0"));
        assert!(!protocol_in_url("redis://h/?db=1"));
    }
}
