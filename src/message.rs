//! Messages: the maps that travel through channels and groups.
//!
//! A [`Message`] is an ordered map with string keys and msgpack-compatible [`Value`]s, with a
//! `type` key that says what it is (`"websocket.send"`, `"chat.message"` …). Text and bytes stay
//! distinct all the way to Python (`str` vs `bytes`), and both are reference-counted buffers, so
//! a message can be shared by every member of a group without copying its payload.
//!
//! Messages are immutable once shared: cloning a `Message` is one reference-count increment, and
//! [`Message::insert`] copies the map only if it is shared (copy on write).

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use bytestring::ByteString;

/// The key that names a message's type.
pub const TYPE_KEY: &str = "type";

/// Errors from reading or decoding a message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// A required key is absent.
    #[error("message has no {0:?} key")]
    MissingKey(String),
    /// A key holds a value of another type.
    #[error("message key {key:?} is {found}, not {expected}")]
    WrongType {
        /// The key that was read.
        key: String,
        /// What the reader expected.
        expected: &'static str,
        /// What the key holds.
        found: &'static str,
    },
    /// The bytes are not a msgpack map with string keys.
    #[error("cannot decode message: {0}")]
    Decode(String),
    /// The JSON text is not an object, or holds something msgpack cannot carry.
    #[error("invalid JSON message: {0}")]
    Json(String),
}

/// One value inside a message: what msgpack (and so Python's `channels_redis`) can carry.
#[derive(Clone, PartialEq)]
pub enum Value {
    /// `None` in Python.
    Nil,
    /// A boolean.
    Bool(bool),
    /// A signed integer (every integer that fits `i64`).
    Int(i64),
    /// An unsigned integer above `i64::MAX`.
    UInt(u64),
    /// A 64-bit float (Python floats are doubles).
    Float(f64),
    /// UTF-8 text (`str` in Python), shared by reference count.
    Str(ByteString),
    /// Raw bytes (`bytes` in Python), shared by reference count.
    Bytes(Bytes),
    /// A list (Python lists and tuples).
    List(Vec<Value>),
    /// A map with string keys, in insertion order.
    Map(Map),
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Nil => f.write_str("nil"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::UInt(u) => write!(f, "{u}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Str(s) => write!(f, "{:?}", &**s),
            Value::Bytes(b) => write!(f, "b{b:?}"),
            Value::List(l) => f.debug_list().entries(l).finish(),
            Value::Map(m) => m.fmt(f),
        }
    }
}

impl Value {
    /// The text, if this is a `Str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The bytes, if this is `Bytes`.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The integer, if this is an integer that fits `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// True for `Nil`.
    pub fn is_nil(&self) -> bool {
        matches!(self, Value::Nil)
    }

    fn type_name(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Bool(_) => "a bool",
            Value::Int(_) | Value::UInt(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Str(_) => "text",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "a list",
            Value::Map(_) => "a map",
        }
    }
}

macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self { Value::Int(i64::from(v)) }
        }
    )*};
}
from_int!(i8, i16, i32, i64, u16, u32);

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        i64::try_from(v).map_or(Value::UInt(v), Value::Int)
    }
}
impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::from(v as u64)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(ByteString::from(v))
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(ByteString::from(v))
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Str(ByteString::from(v.as_str()))
    }
}
impl From<ByteString> for Value {
    fn from(v: ByteString) -> Self {
        Value::Str(v)
    }
}
impl From<Bytes> for Value {
    fn from(v: Bytes) -> Self {
        Value::Bytes(v)
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bytes(Bytes::from(v))
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Bytes(Bytes::copy_from_slice(v))
    }
}
impl From<Vec<Value>> for Value {
    fn from(v: Vec<Value>) -> Self {
        Value::List(v)
    }
}
impl From<Map> for Value {
    fn from(v: Map) -> Self {
        Value::Map(v)
    }
}
impl From<Message> for Value {
    fn from(v: Message) -> Self {
        Value::Map(v.into_map())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Nil, Into::into)
    }
}

/// An ordered map with string keys: the body of a [`Message`] and of nested maps.
///
/// Lookups are linear: messages hold a handful of keys, where a scan beats hashing.
#[derive(Clone, Default, PartialEq)]
pub struct Map {
    entries: Vec<(ByteString, Value)>,
}

impl fmt::Debug for Map {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.entries.iter().map(|(k, v)| (&**k, v)))
            .finish()
    }
}

impl Map {
    /// An empty map (allocates nothing).
    pub fn new() -> Self {
        Map::default()
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| v)
    }

    /// Sets `key`, keeping the position of an existing key.
    pub fn insert(&mut self, key: impl Into<ByteString>, value: impl Into<Value>) {
        let key = key.into();
        let value = value.into();
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.entries.push((key, value)),
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let pos = self.entries.iter().position(|(k, _)| &**k == key)?;
        Some(self.entries.remove(pos).1)
    }

    /// The entries in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (&**k, v))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the map has no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<K: Into<ByteString>, V: Into<Value>> FromIterator<(K, V)> for Map {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut map = Map::new();
        for (k, v) in iter {
            map.insert(k, v);
        }
        map
    }
}

/// A message: a shared, immutable map whose `type` key says what it is.
///
/// Cloning is cheap (one reference count), which is how a group send reaches N local members
/// with one payload. Build one with [`msg!`](crate::msg).
#[derive(Clone, Default, PartialEq)]
pub struct Message(Arc<Map>);

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<Map> for Message {
    fn from(map: Map) -> Self {
        Message(Arc::new(map))
    }
}

impl Message {
    /// A message with only a `type`.
    pub fn new(kind: &str) -> Self {
        let mut map = Map::new();
        map.insert(TYPE_KEY, kind);
        Message::from(map)
    }

    /// The `type`, if the message has a text `type` key.
    pub fn kind(&self) -> Option<&str> {
        self.0.get(TYPE_KEY).and_then(Value::as_str)
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// The text under `key`, or a typed error saying what is wrong.
    pub fn str(&self, key: &str) -> Result<&str, MessageError> {
        self.typed(key, "text", Value::as_str)
    }

    /// The text under `key` as a shared buffer (no copy).
    pub fn text_value(&self, key: &str) -> Option<&ByteString> {
        match self.0.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// The bytes under `key`, or a typed error.
    pub fn bytes(&self, key: &str) -> Result<&Bytes, MessageError> {
        self.typed(key, "bytes", Value::as_bytes)
    }

    /// The integer under `key`, or a typed error.
    pub fn int(&self, key: &str) -> Result<i64, MessageError> {
        self.typed(key, "an integer", Value::as_i64)
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        read: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<T, MessageError> {
        let value = self
            .0
            .get(key)
            .ok_or_else(|| MessageError::MissingKey(key.to_owned()))?;
        read(value).ok_or_else(|| MessageError::WrongType {
            key: key.to_owned(),
            expected,
            found: value.type_name(),
        })
    }

    /// Sets `key` (copies the map first if it is shared).
    pub fn insert(&mut self, key: impl Into<ByteString>, value: impl Into<Value>) {
        Arc::make_mut(&mut self.0).insert(key, value);
    }

    /// Removes `key` (copies the map first if it is shared).
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.0.get(key)?;
        Arc::make_mut(&mut self.0).remove(key)
    }

    /// Builder form of [`insert`](Self::insert).
    pub fn with(mut self, key: impl Into<ByteString>, value: impl Into<Value>) -> Self {
        self.insert(key, value);
        self
    }

    /// The underlying map.
    pub fn map(&self) -> &Map {
        &self.0
    }

    /// The map, copied only if shared.
    pub fn into_map(self) -> Map {
        Arc::try_unwrap(self.0).unwrap_or_else(|shared| (*shared).clone())
    }

    /// True when both are the same shared allocation (no copy was made between them).
    pub fn ptr_eq(&self, other: &Message) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Encodes as msgpack exactly as Python's `msgpack.packb` does (str as str, bytes as bin).
    pub fn to_msgpack(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        encode_map(&mut out, &self.0);
        out
    }

    /// Appends the msgpack encoding to `out`.
    pub fn write_msgpack(&self, out: &mut Vec<u8>) {
        encode_map(out, &self.0);
    }

    /// Decodes a msgpack map with string keys (what `channels_redis` stores after its prefix).
    pub fn from_msgpack(mut bytes: &[u8]) -> Result<Message, MessageError> {
        let value = rmpv::decode::read_value_with_max_depth(&mut bytes, 64)
            .map_err(|e| MessageError::Decode(e.to_string()))?;
        if !bytes.is_empty() {
            return Err(MessageError::Decode(format!(
                "{} trailing bytes after the message",
                bytes.len()
            )));
        }
        match from_rmpv(value)? {
            Value::Map(map) => Ok(Message::from(map)),
            other => Err(MessageError::Decode(format!(
                "expected a map, found {}",
                other.type_name()
            ))),
        }
    }

    /// Parses a JSON object into a message (JSON strings become text; JSON has no bytes).
    pub fn from_json(text: &str) -> Result<Message, MessageError> {
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| MessageError::Json(e.to_string()))?;
        match from_json_value(json)? {
            Value::Map(map) => Ok(Message::from(map)),
            other => Err(MessageError::Json(format!(
                "expected an object, found {}",
                other.type_name()
            ))),
        }
    }

    /// Renders as JSON; bytes become arrays of numbers.
    pub fn to_json(&self) -> serde_json::Value {
        to_json_value(&Value::Map((*self.0).clone()))
    }
}

/// Builds a [`Message`] from `"key": value` pairs; values are anything `Into<Value>`.
///
/// ```
/// let m = canal::msg! { "type": "chat.message", "text": "hi", "n": 3 };
/// assert_eq!(m.kind(), Some("chat.message"));
/// assert_eq!(m.str("text").unwrap(), "hi");
/// ```
#[macro_export]
macro_rules! msg {
    () => { $crate::Message::default() };
    ($($key:literal : $value:expr),+ $(,)?) => {{
        let mut map = $crate::Map::new();
        $( map.insert($key, $value); )+
        $crate::Message::from(map)
    }};
}

fn encode_value(out: &mut Vec<u8>, value: &Value) {
    // Writes to a Vec cannot fail; the results are ignored on purpose.
    match value {
        Value::Nil => {
            let _ = rmp::encode::write_nil(out);
        }
        Value::Bool(b) => {
            let _ = rmp::encode::write_bool(out, *b);
        }
        Value::Int(i) => {
            let _ = rmp::encode::write_sint(out, *i);
        }
        Value::UInt(u) => {
            let _ = rmp::encode::write_uint(out, *u);
        }
        Value::Float(f) => {
            let _ = rmp::encode::write_f64(out, *f);
        }
        Value::Str(s) => {
            let _ = rmp::encode::write_str(out, s);
        }
        Value::Bytes(b) => {
            let _ = rmp::encode::write_bin(out, b);
        }
        Value::List(items) => {
            let _ = rmp::encode::write_array_len(out, items.len() as u32);
            for item in items {
                encode_value(out, item);
            }
        }
        Value::Map(map) => encode_map(out, map),
    }
}

fn encode_map(out: &mut Vec<u8>, map: &Map) {
    let _ = rmp::encode::write_map_len(out, map.len() as u32);
    for (k, v) in &map.entries {
        let _ = rmp::encode::write_str(out, k);
        encode_value(out, v);
    }
}

fn from_rmpv(value: rmpv::Value) -> Result<Value, MessageError> {
    Ok(match value {
        rmpv::Value::Nil => Value::Nil,
        rmpv::Value::Boolean(b) => Value::Bool(b),
        rmpv::Value::Integer(i) => match i.as_i64() {
            Some(v) => Value::Int(v),
            None => Value::UInt(i.as_u64().unwrap_or(u64::MAX)),
        },
        rmpv::Value::F32(f) => Value::Float(f64::from(f)),
        rmpv::Value::F64(f) => Value::Float(f),
        rmpv::Value::String(s) => match s.into_str() {
            Some(s) => Value::Str(ByteString::from(s)),
            None => return Err(MessageError::Decode("text is not valid UTF-8".into())),
        },
        rmpv::Value::Binary(b) => Value::Bytes(Bytes::from(b)),
        rmpv::Value::Array(items) => {
            Value::List(items.into_iter().map(from_rmpv).collect::<Result<_, _>>()?)
        }
        rmpv::Value::Map(pairs) => {
            let mut map = Map::new();
            for (k, v) in pairs {
                let key = match k {
                    rmpv::Value::String(s) => s
                        .into_str()
                        .ok_or_else(|| MessageError::Decode("map key is not valid UTF-8".into()))?,
                    _ => return Err(MessageError::Decode("map key is not text".into())),
                };
                map.entries.push((ByteString::from(key), from_rmpv(v)?));
            }
            Value::Map(map)
        }
        rmpv::Value::Ext(..) => {
            return Err(MessageError::Decode(
                "msgpack extension types are not supported".into(),
            ));
        }
    })
}

pub(crate) fn from_json_value(json: serde_json::Value) -> Result<Value, MessageError> {
    Ok(match json {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Bool(b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::Str(ByteString::from(s)),
        serde_json::Value::Array(items) => Value::List(
            items
                .into_iter()
                .map(from_json_value)
                .collect::<Result<_, _>>()?,
        ),
        serde_json::Value::Object(obj) => {
            let mut map = Map::new();
            for (k, v) in obj {
                map.entries.push((ByteString::from(k), from_json_value(v)?));
            }
            Value::Map(map)
        }
    })
}

fn to_json_value(value: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        Value::Nil => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::UInt(u) => J::from(*u),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::Str(s) => J::String(s.to_string()),
        Value::Bytes(b) => J::Array(b.iter().map(|x| J::from(*x)).collect()),
        Value::List(items) => J::Array(items.iter().map(to_json_value).collect()),
        Value::Map(map) => J::Object(
            map.entries
                .iter()
                .map(|(k, v)| (k.to_string(), to_json_value(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn msgpack_matches_python_packb() {
        // msgpack.packb({"type": "job", "x": 1}) in Python 3 with msgpack 1.x.
        let m = msg! { "type": "job", "x": 1 };
        assert_eq!(hex(&m.to_msgpack()), "82a474797065a36a6f62a17801");
        // Integers take Python's smallest encodings; bytes are bin, text is str.
        let m = msg! { "a": 200, "b": -200, "c": 1099511627776u64, "d": b"\x00\xff".to_vec(), "e": 1.5 };
        assert_eq!(
            hex(&m.to_msgpack()),
            "85a161ccc8a162d1ff38a163cf0000010000000000a164c40200ffa165cb3ff8000000000000"
        );
    }

    #[test]
    fn msgpack_round_trip_keeps_str_and_bytes_apart() {
        let nested = Value::List(vec![Value::Int(-3), Value::Nil, Value::from("é")]);
        let m = msg! { "type": "t", "s": "héllo", "b": vec![0u8, 1, 255], "l": nested.clone(), "big": u64::MAX, "t": true };
        let back = Message::from_msgpack(&m.to_msgpack()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.get("s"), Some(&Value::from("héllo")));
        assert!(matches!(back.get("b"), Some(Value::Bytes(_))));
        assert_eq!(back.get("big"), Some(&Value::UInt(u64::MAX)));
    }

    #[test]
    fn decode_rejects_garbage_without_panicking() {
        for bad in [
            &b""[..],
            b"\xc1",
            b"\x91\x01",
            b"\x81\x01\x02",
            b"\x82\xa1a",
            b"\xdf\xff\xff\xff\xff",
            b"\x81\xa1a\xc7\x01\x05\x00",
            b"\x80\x00",
        ] {
            assert!(Message::from_msgpack(bad).is_err(), "{bad:?}");
        }
        // Deep nesting is bounded rather than overflowing the stack.
        let deep = vec![0x91u8; 100_000];
        assert!(Message::from_msgpack(&deep).is_err());
    }

    #[test]
    fn accessors_give_typed_errors() {
        let m = msg! { "type": "x", "n": 3 };
        assert_eq!(m.kind(), Some("x"));
        assert_eq!(m.int("n"), Ok(3));
        assert!(matches!(m.str("n"), Err(MessageError::WrongType { .. })));
        assert!(matches!(m.str("zz"), Err(MessageError::MissingKey(_))));
    }

    #[test]
    fn clones_share_one_allocation_until_written() {
        let a = msg! { "type": "x", "text": "payload" };
        let mut b = a.clone();
        assert!(a.ptr_eq(&b));
        b.insert("extra", 1);
        assert!(!a.ptr_eq(&b));
        assert_eq!(a.get("extra"), None);
    }

    #[test]
    fn json_round_trip() {
        let m =
            Message::from_json(r#"{"type":"chat.message","text":"hi","n":[1,2.5,null]}"#).unwrap();
        assert_eq!(m.str("text").unwrap(), "hi");
        assert_eq!(m.to_json()["n"][1], serde_json::json!(2.5));
        assert!(Message::from_json("[1]").is_err());
        assert!(Message::from_json("{").is_err());
    }
}
