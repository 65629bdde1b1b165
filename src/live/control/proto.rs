//! Control messages: a request parsed from one line of JSON, replies, errors and events, in
//! QMP's shapes and (where QMP has them) words.

use serde_json::{json, Map, Value};

/// Longest request line accepted (a longer one is answered with an error and skipped).
pub const MAX_LINE: usize = 1 << 20;

/// An error reply: QMP's class and a description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// `GenericError`, `CommandNotFound`, ...
    pub class: &'static str,
    /// What went wrong.
    pub desc: String,
}

impl CommandError {
    /// A `GenericError` saying `desc`.
    pub fn generic(desc: impl Into<String>) -> Self {
        CommandError {
            class: "GenericError",
            desc: desc.into(),
        }
    }
}

impl From<crate::Error> for CommandError {
    fn from(e: crate::Error) -> Self {
        CommandError::generic(e.to_string())
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The command's name.
    pub execute: String,
    /// Its arguments (an empty object when absent).
    pub arguments: Map<String, Value>,
    /// The id to echo, if any.
    pub id: Option<Value>,
}

/// Parses one request line. An error comes with the request's id when one could be read.
pub fn parse(line: &[u8]) -> Result<Request, (CommandError, Option<Value>)> {
    let v: Value = serde_json::from_slice(line).map_err(|e| {
        (
            CommandError::generic(format!("JSON parse error, {e}")),
            None,
        )
    })?;
    let Value::Object(mut obj) = v else {
        return Err((
            CommandError::generic("QMP input must be a JSON object"),
            None,
        ));
    };
    let id = obj.remove("id");
    let fail = |desc: &str| Err((CommandError::generic(desc), id.clone()));
    let execute = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => return fail("QMP input member 'execute' must be a string"),
        None => return fail("QMP input lacks member 'execute'"),
    };
    let arguments = match obj.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return fail("QMP input member 'arguments' must be an object"),
    };
    if let Some(k) = obj.keys().next() {
        return Err((
            CommandError::generic(format!("QMP input member '{k}' is unexpected")),
            id,
        ));
    }
    Ok(Request {
        execute,
        arguments,
        id,
    })
}

/// The line answering a request with `id`: its return value or its error.
pub fn reply(result: Result<Value, CommandError>, id: Option<Value>) -> String {
    let mut obj = Map::new();
    match result {
        Ok(v) => {
            obj.insert("return".into(), v);
        }
        Err(e) => {
            obj.insert("error".into(), json!({"class": e.class, "desc": e.desc}));
        }
    }
    if let Some(id) = id {
        obj.insert("id".into(), id);
    }
    let mut s = Value::Object(obj).to_string();
    s.push('\n');
    s
}

/// The greeting line.
pub fn greeting() -> String {
    let v = json!({"QMP": {
        "version": {"package": "vimg", "vimg": env!("CARGO_PKG_VERSION")},
        "capabilities": []
    }});
    format!("{v}\n")
}

/// An event line, stamped with the time.
pub fn event(name: &str, data: Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let v = json!({
        "event": name,
        "data": data,
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()}
    });
    format!("{v}\n")
}

/// Argument `name` as a string (required).
pub fn str_arg<'a>(args: &'a Map<String, Value>, name: &str) -> Result<&'a str, CommandError> {
    match args.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(CommandError::generic(format!(
            "Invalid parameter type for '{name}', expected: string"
        ))),
        None => Err(CommandError::generic(format!(
            "Parameter '{name}' is missing"
        ))),
    }
}

/// Argument `name` as a string, if given.
pub fn opt_str_arg<'a>(
    args: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, CommandError> {
    match args.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => str_arg(args, name).map(Some),
    }
}

/// Argument `name` as a boolean, `default` when absent.
pub fn bool_arg(
    args: &Map<String, Value>,
    name: &str,
    default: bool,
) -> Result<bool, CommandError> {
    match args.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(CommandError::generic(format!(
            "Invalid parameter type for '{name}', expected: boolean"
        ))),
    }
}

/// Argument `name` as an unsigned integer, if given.
pub fn u64_arg(args: &Map<String, Value>, name: &str) -> Result<Option<u64>, CommandError> {
    match args.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            CommandError::generic(format!(
                "Invalid parameter type for '{name}', expected: integer"
            ))
        }),
    }
}

/// Argument `name` as a list of strings (required, possibly empty).
pub fn str_list_arg(args: &Map<String, Value>, name: &str) -> Result<Vec<String>, CommandError> {
    let bad = || {
        CommandError::generic(format!(
            "Invalid parameter type for '{name}', expected: array of strings"
        ))
    };
    match args.get(name) {
        None => Err(CommandError::generic(format!(
            "Parameter '{name}' is missing"
        ))),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(String::from).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// Checks that `args` holds no key outside `known`.
pub fn known_args(args: &Map<String, Value>, known: &[&str]) -> Result<(), CommandError> {
    match args.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(CommandError::generic(format!(
            "Parameter '{k}' is unexpected"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_errors_keep_the_id() {
        let r = parse(br#"{"execute": "query-jobs", "id": 7}"#).unwrap();
        assert_eq!(r.execute, "query-jobs");
        assert_eq!(r.id, Some(json!(7)));
        assert!(r.arguments.is_empty());
        let (e, id) = parse(br#"{"execute": 3, "id": "x"}"#).unwrap_err();
        assert_eq!(e.class, "GenericError");
        assert_eq!(id, Some(json!("x")));
        assert!(parse(b"[1,2]").is_err());
        assert!(parse(b"{\"execute\":\"a\",\"arguments\":[]}").is_err());
        assert!(parse(b"{\"execute\":\"a\",\"bogus\":1}").is_err());
        assert!(parse(b"\xff\xfe").is_err());
        let line = reply(Err(CommandError::generic("no")), Some(json!(1)));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["error"]["desc"], "no");
        assert_eq!(v["id"], 1);
    }

    /// Random bytes and mangled requests never panic and always give an answer or an error.
    #[test]
    fn mangled_requests_are_errors_not_panics() {
        let good = br#"{"execute": "backup-start", "arguments": {"devices": ["a"], "target": "fd:x"}, "id": 1}"#;
        let mut seed = 0x2545f4914f6cdd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut m = good.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % m.len();
                match next() % 3 {
                    0 => m[i] = next() as u8,
                    1 => {
                        m.remove(i);
                    }
                    _ => m.insert(i, next() as u8),
                }
                if m.is_empty() {
                    m.push(b'{');
                }
            }
            if let Ok(r) = parse(&m) {
                let _ = str_list_arg(&r.arguments, "devices");
                let _ = str_arg(&r.arguments, "target");
            }
        }
    }
}
