//! The Lua scripts of the owner-checked operations, and the server's native
//! compare-and-delete commands.

use std::sync::LazyLock;

use ::redis::Value;

use super::TokenCheck;
use crate::error::{BackendError, BackendResult};

/// Which server-side compare-and-delete command the server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NativeDelete {
    /// Redis 8.4+: `DELEX key IFEQ value`.
    Delex,
    /// Valkey 9+: `DELIFEQ key value`.
    DelIfEq,
}

/// The Lua function that numbers a grant: `INCR` of the fence counter
/// `counter`, raised to the floor (the server's `TIME` in microseconds) if
/// it restarted below it, with a TTL of `ttl` ms; returns the fence. Shared
/// by the scripts that number grants ([`fenced`]).
const NUMBER_GRANT: &str = r"
local function number_grant(counter, ttl)
  local t = redis.call('TIME')
  local floor = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local n = redis.call('INCR', counter)
  if n < floor then
    n = floor
    redis.call('SET', counter, string.format('%d', n))
  end
  redis.call('PEXPIRE', counter, ttl)
  return n
end
";

/// A script whose `body` may call `number_grant` ([`NUMBER_GRANT`]).
fn fenced(body: &str) -> ::redis::Script {
    ::redis::Script::new(&format!("{NUMBER_GRANT}{body}"))
}

/// Deletes KEYS[1] if it holds ARGV[1] and announces it on the channel
/// ARGV[2] (in the same script, so atomic with the delete).
/// 1 + n: deleted, the notice reached n subscribers; 0: another value;
/// -1: absent.
///
/// With a wait queue (KEYS[2], see [`ADD_QUEUED`]) whose head is a waiter,
/// the lock is not deleted but reserved for that waiter for ARGV[4] ms
/// (the value ARGV[3] followed by the waiter's value, which no one else's
/// add matches), and the notice names it.
pub(super) static DELETE_IF_EQ: LazyLock<::redis::Script> = LazyLock::new(|| {
    ::redis::Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v == false then return -1 end
if v ~= ARGV[1] then return 0 end
local nxt = false
if KEYS[2] then nxt = redis.call('LPOP', KEYS[2]) end
if nxt then
  redis.call('SET', KEYS[1], ARGV[3] .. nxt, 'PX', ARGV[4])
else
  redis.call('DEL', KEYS[1])
  nxt = ''
end
return 1 + redis.call('PUBLISH', ARGV[2], nxt)
",
    )
});

/// The add of a waiter that waits in line: stores ARGV[1] under KEYS[1]
/// with a TTL of ARGV[2] ms if the key is absent or reserved for this
/// waiter (it holds ARGV[3] followed by ARGV[1], see [`DELETE_IF_EQ`]) or
/// already ours (a retried attempt), and
/// then leaves the wait queue KEYS[2] and numbers the grant as
/// [`ADD_FENCED`] does (counter KEYS[3], its TTL ARGV[5] ms). Otherwise it
/// joins the end of the queue (once; at most ARGV[4] waiters) and keeps
/// the queue ARGV[2] ms. Returns the fence, or 0 if the key is held.
pub(super) static ADD_QUEUED: LazyLock<::redis::Script> = LazyLock::new(|| {
    fenced(
        r"
local added = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
if not added then
  local cur = redis.call('GET', KEYS[1])
  if cur == ARGV[3] .. ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    added = true
  elseif cur == ARGV[1] then
    -- A retried attempt whose first try landed: ours.
    added = true
  end
end
if added then
  redis.call('LREM', KEYS[2], 1, ARGV[1])
  return number_grant(KEYS[3], ARGV[5])
end
if not redis.call('LPOS', KEYS[2], ARGV[1])
    and redis.call('LLEN', KEYS[2]) < tonumber(ARGV[4]) then
  redis.call('RPUSH', KEYS[2], ARGV[1])
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 0
",
    )
});

/// Sets a TTL of ARGV[2] ms on KEYS[1] if it holds ARGV[1].
/// 1: extended; 0: another value; -1: absent.
pub(super) static EXTEND_IF_EQ: LazyLock<::redis::Script> = LazyLock::new(|| {
    ::redis::Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v == false then return -1 end
if v ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
",
    )
});

/// Compare-and-set: stores ARGV[2] under KEYS[1] with a TTL of ARGV[3] ms
/// if the key holds ARGV[1]. 1: stored (or the key already held ARGV[2]:
/// a retried call whose first try landed); 0: another value or absent.
pub(super) static SET_IF_EQ: LazyLock<::redis::Script> = LazyLock::new(|| {
    ::redis::Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[2] then return 1 end
if v ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
",
    )
});

/// The lock's add and its fence in one step. Stores ARGV[1] under KEYS[1]
/// with a TTL of ARGV[2] ms if the key is absent (or already holds ARGV[1]:
/// a retried first attempt), then numbers the grant: INCR of the counter
/// KEYS[2], raised to the floor (the server's `TIME` in microseconds) if it
/// restarted below it (`number_grant`), with a TTL of ARGV[3] ms. Returns the fence, or 0 if
/// the key is held by someone else.
pub(super) static ADD_FENCED: LazyLock<::redis::Script> = LazyLock::new(|| {
    fenced(
        r"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
end
return number_grant(KEYS[2], ARGV[3])
",
    )
});

/// The fence alone (for a Cluster key whose counter is in another slot):
/// as in [`ADD_FENCED`], on KEYS[1] with a TTL of ARGV[1] ms.
pub(super) static FENCE: LazyLock<::redis::Script> = LazyLock::new(|| {
    fenced(
        r"
return number_grant(KEYS[1], ARGV[1])
",
    )
});

pub(super) fn token_check(key: &str, code: i64) -> BackendResult<TokenCheck> {
    match code {
        1 => Ok(TokenCheck::Matched),
        0 => Ok(TokenCheck::Mismatch),
        -1 => Ok(TokenCheck::Missing),
        other => Err(BackendError::protocol(
            key,
            format!("unexpected reply {other} from an owner-checked operation"),
        )),
    }
}

/// Reads the reply to `COMMAND INFO DELEX DELIFEQ`: one entry per name,
/// nil for a command the server does not know.
pub(super) fn native_delete_from_command_info(reply: &Value) -> Option<NativeDelete> {
    let entries = match reply {
        Value::Array(items) | Value::Set(items) => items,
        _ => return None,
    };
    let known = |i: usize| {
        entries.get(i).is_some_and(|v| {
            !matches!(v, Value::Nil) && !matches!(v, Value::Array(a) if a.is_empty())
        })
    };
    if known(0) {
        Some(NativeDelete::Delex)
    } else if known(1) {
        Some(NativeDelete::DelIfEq)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_native_delete_from_command_info() {
        let nil2 = Value::Array(vec![Value::Nil, Value::Nil]);
        assert_eq!(native_delete_from_command_info(&nil2), None);
        let info = Value::Array(vec![Value::BulkString(b"delex".to_vec())]);
        let delex = Value::Array(vec![info.clone(), Value::Nil]);
        assert_eq!(
            native_delete_from_command_info(&delex),
            Some(NativeDelete::Delex)
        );
        let delifeq = Value::Array(vec![Value::Nil, info]);
        assert_eq!(
            native_delete_from_command_info(&delifeq),
            Some(NativeDelete::DelIfEq)
        );
        assert_eq!(native_delete_from_command_info(&Value::Nil), None);
        assert_eq!(native_delete_from_command_info(&Value::Int(3)), None);
    }

    #[test]
    fn token_codes() {
        assert_eq!(token_check("k", 1).unwrap(), TokenCheck::Matched);
        assert_eq!(token_check("k", 0).unwrap(), TokenCheck::Mismatch);
        assert_eq!(token_check("k", -1).unwrap(), TokenCheck::Missing);
        assert!(matches!(
            token_check("k", 7),
            Err(BackendError::Protocol { .. })
        ));
    }
}
