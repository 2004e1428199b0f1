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

/// The Lua function that gives up the lock `key` (its holder's release, or
/// a waiter that was handed it as it stopped waiting): hands it straight
/// to the first waiter in the wait queue `queue` ([`ADD_QUEUED`]), or
/// deletes it if no one waits, and announces which on `channel`.
///
/// A queue entry is `<claim ms>:<waiter's value>` (the waiter's lease or
/// `HANDOFF_CLAIM`, whichever is shorter); the hand-off stores the
/// waiter's value with that TTL, numbers the grant
/// (`number_grant` on `counter`, its TTL `fence_ttl` ms) and publishes
/// `<fence>:<waiter's value>`: the named waiter holds the lock from then on
/// and needs no command to take it (it extends the claim to its lease). An entry of another shape (not ours,
/// or a TTL over 13 digits, more than any lease) is dropped. A free lock is announced with an empty message. Returns the
/// number of subscribers the notice reached.
const HAND_ON: &str = r"
local function hand_on(key, queue, counter, channel, fence_ttl)
  while true do
    local entry = redis.call('LPOP', queue)
    if not entry then break end
    local ttl = string.match(entry, '^([1-9]%d*):')
    if ttl and #ttl <= 13 then
      local waiter = string.sub(entry, #ttl + 2)
      redis.call('SET', key, waiter, 'PX', ttl)
      local fence = number_grant(counter, fence_ttl)
      return redis.call('PUBLISH', channel, string.format('%d', fence) .. ':' .. waiter)
    end
  end
  redis.call('DEL', key)
  return redis.call('PUBLISH', channel, '')
end
";

/// A script whose `body` may call `number_grant` ([`NUMBER_GRANT`]) and
/// `hand_on` ([`HAND_ON`]).
fn fenced(body: &str) -> ::redis::Script {
    ::redis::Script::new(&format!("{NUMBER_GRANT}{HAND_ON}{body}"))
}

/// Deletes KEYS[1] if it holds ARGV[1] and announces it on the channel
/// ARGV[2] (in the same script, so atomic with the delete).
/// 1 + n: deleted, the notice reached n subscribers; 0: another value;
/// -1: absent.
///
/// With a wait queue (KEYS[2], see [`ADD_QUEUED`]; fence counter KEYS[3],
/// its TTL ARGV[3] ms) the lock is handed to the first waiter in line
/// instead of deleted (`hand_on`, [`HAND_ON`]).
pub(super) static DELETE_IF_EQ: LazyLock<::redis::Script> = LazyLock::new(|| {
    fenced(
        r"
local v = redis.call('GET', KEYS[1])
if v == false then return -1 end
if v ~= ARGV[1] then return 0 end
if KEYS[2] then
  return 1 + hand_on(KEYS[1], KEYS[2], KEYS[3], ARGV[2], ARGV[3])
end
redis.call('DEL', KEYS[1])
return 1 + redis.call('PUBLISH', ARGV[2], '')
",
    )
});

/// The add of a waiter that waits in line: stores ARGV[1] under KEYS[1]
/// with a TTL of ARGV[2] ms if the key is absent, then leaves the wait
/// queue KEYS[2] and numbers the grant as [`ADD_FENCED`] does (counter
/// KEYS[3], its TTL ARGV[4] ms); returns the fence. If the key already
/// holds ARGV[1] it is ours (a release handed it to us and we missed the
/// notice, or a retried attempt whose first try landed): its TTL is set to
/// ARGV[2] ms from now and the fence of that grant (the counter) returned.
///
/// Otherwise the waiter joins the end of the queue as the entry
/// `ARGV[5]:ARGV[1]` (its claim, see [`HAND_ON`]; once; at most ARGV[3]
/// waiters), the
/// queue is kept ARGV[2] ms, and the reply is the negated fence of the
/// latest grant (0 if none is known): a hand-off notice naming this waiter
/// with a fence not above it is older than this attempt.
pub(super) static ADD_QUEUED: LazyLock<::redis::Script> =
    LazyLock::new(|| fenced(&format!("{ADD_QUEUED_FN}return add_queued()")));

/// [`ADD_QUEUED`], then the values of KEYS[4] onwards ([`READ_AFTER`]).
pub(super) static ADD_QUEUED_READING: LazyLock<::redis::Script> = LazyLock::new(|| {
    fenced(&format!(
        "{ADD_QUEUED_FN}{READ_AFTER}return read_after(add_queued(), 4)"
    ))
});

/// The body of [`ADD_QUEUED`], as the Lua function `add_queued()`.
const ADD_QUEUED_FN: &str = r"
local function add_queued()
local entry = ARGV[5] .. ':' .. ARGV[1]
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('LREM', KEYS[2], 1, entry)
  return number_grant(KEYS[3], ARGV[4])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local n = tonumber(redis.call('GET', KEYS[3]))
  if n and n > 0 then return n end
  return number_grant(KEYS[3], ARGV[4])
end
if not redis.call('LPOS', KEYS[2], entry)
    and redis.call('LLEN', KEYS[2]) < tonumber(ARGV[3]) then
  redis.call('RPUSH', KEYS[2], entry)
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return -(tonumber(redis.call('GET', KEYS[3])) or 0)
end
";

/// A waiter that stops waiting: takes its entry `ARGV[2]:ARGV[1]` (ARGV[2]
/// its claim, as [`ADD_QUEUED`] wrote it) out of
/// the wait queue KEYS[2], and if a release already handed it the lock
/// KEYS[1] (it holds ARGV[1]), gives the lock up as a release does
/// (`hand_on`, [`HAND_ON`]; channel ARGV[3], counter KEYS[3], its TTL
/// ARGV[4] ms). Returns 1 if it gave up the lock, else 0.
pub(super) static LEAVE_QUEUE: LazyLock<::redis::Script> = LazyLock::new(|| {
    fenced(
        r"
redis.call('LREM', KEYS[2], 1, ARGV[2] .. ':' .. ARGV[1])
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
hand_on(KEYS[1], KEYS[2], KEYS[3], ARGV[3], ARGV[4])
return 1
",
    )
});

/// The Lua function `read_after(fence, from)` of the scripts that read
/// with the lock's add: returns `{fence, values}`, the values of KEYS[from]
/// onwards in order (false for an absent key), or `{fence, message}` if a
/// key could not be read (a key of another type): the add's outcome is
/// not lost to a failed read.
const READ_AFTER: &str = r"
local function read_after(fence, from)
  local values = {}
  for i = from, #KEYS do
    local v = redis.pcall('GET', KEYS[i])
    if type(v) == 'table' and v.err then return {fence, v.err} end
    values[#values + 1] = v
  end
  return {fence, values}
end
";

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
pub(super) static ADD_FENCED: LazyLock<::redis::Script> =
    LazyLock::new(|| fenced(&format!("{ADD_FENCED_FN}return add_fenced()")));

/// [`ADD_FENCED`], then the values of KEYS[3] onwards ([`READ_AFTER`]).
pub(super) static ADD_FENCED_READING: LazyLock<::redis::Script> = LazyLock::new(|| {
    fenced(&format!(
        "{ADD_FENCED_FN}{READ_AFTER}return read_after(add_fenced(), 3)"
    ))
});

/// The body of [`ADD_FENCED`], as the Lua function `add_fenced()`.
const ADD_FENCED_FN: &str = r"
local function add_fenced()
  if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
  end
  return number_grant(KEYS[2], ARGV[3])
end
";

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
