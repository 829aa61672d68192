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

/// The fields of a `lost` line after its time, as both tools write them: `event` (`lost`),
/// `cause` (`overrun`, or `seq_gap` with `cpu`), `count` (the exact gap, `null` for an
/// overrun, whose count only the totals know). Flattened into each tool's record, which
/// names its time field (`time` for proctrace, `ts` for the agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LostFields {
    pub event: &'static str,
    pub cause: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    pub count: Option<u32>,
}

impl From<cnbus::proc::Loss> for LostFields {
    fn from(loss: cnbus::proc::Loss) -> Self {
        use cnbus::proc::Loss;
        let (cause, cpu, count) = match loss {
            Loss::Overrun => ("overrun", None, None),
            Loss::Gap { cpu, count } => ("seq_gap", Some(cpu), Some(count)),
        };
        LostFields {
            event: "lost",
            cause,
            cpu,
            count,
        }
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

    #[test]
    fn lost_fields_of_a_gap_and_an_overrun() {
        use cnbus::proc::Loss;
        let mut out = Vec::new();
        push_line(&mut out, &LostFields::from(Loss::Gap { cpu: 3, count: 7 })).unwrap();
        push_line(&mut out, &LostFields::from(Loss::Overrun)).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"event\":\"lost\",\"cause\":\"seq_gap\",\"cpu\":3,\"count\":7}\n\
             {\"event\":\"lost\",\"cause\":\"overrun\",\"count\":null}\n"
        );
    }
}
