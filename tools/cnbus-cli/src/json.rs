//! One JSON object per line, written with `serde_json`: the tools' event lines, loss
//! lines, counters and table dumps are plain `#[derive(Serialize)]` records (the process
//! attribution fields come from the library's own `Serialize` of
//! [`ProcessInfo`](cnbus::proc::ProcessInfo), flattened into them).

use serde::ser::{Serialize, SerializeMap, Serializer};

/// Appends `record` as one JSON object and a newline to `out`. Serialising the tools'
/// records (strings, numbers, options, maps with string keys) cannot fail; should a
/// record ever fail, `out` is left as it was and the error is returned.
pub fn push_line(out: &mut Vec<u8>, record: &impl Serialize) -> serde_json::Result<()> {
    let len = out.len();
    match serde_json::to_writer(&mut *out, record) {
        Ok(()) => {
            out.push(b'\n');
            Ok(())
        }
        Err(e) => {
            out.truncate(len);
            Err(e)
        }
    }
}

/// Serialises key/value pairs as a JSON object in their order (`serde_json`'s own map
/// sorts its keys).
#[derive(Debug, Clone, Copy)]
pub struct Ordered<'a, K, V>(pub &'a [(K, V)]);

impl<K: Serialize, V: Serialize> Serialize for Ordered<'_, K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// A float rounded to `decimals` places for output (`duration_ms`, rates): fewer digits
/// than the clocks behind it cannot tell.
pub fn round(v: f64, decimals: i32) -> f64 {
    let p = 10f64.powi(decimals);
    (v * p).round() / p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize)]
    struct R<'a> {
        name: &'a str,
        n: Option<u32>,
        m: Ordered<'a, u32, u64>,
    }

    #[test]
    fn lines_are_escaped_and_ordered() {
        let mut out = b"x\n".to_vec();
        let r = R {
            name: "a\"b\\c\nd\u{1}\u{7f}é",
            n: None,
            m: Ordered(&[(3, 1), (1, 2)]),
        };
        push_line(&mut out, &r).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "x\n{\"name\":\"a\\\"b\\\\c\\nd\\u0001\u{7f}é\",\"n\":null,\"m\":{\"3\":1,\"1\":2}}\n"
        );
        assert_eq!(round(1.23456, 3), 1.235);
    }
}
