//! Subject tokens and subject coverage.

/// Makes `s` one subject token: `.`, `*`, `>`, whitespace and control characters become `_`;
/// an empty string becomes `_`.
pub fn sanitize_token(s: &str) -> String {
    if s.is_empty() {
        return "_".to_owned();
    }
    s.chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Whether every subject matched by `wanted` is matched by `pattern` (NATS wildcards: `*` one
/// token, `>` one or more trailing tokens).
pub fn subject_covers(pattern: &str, wanted: &str) -> bool {
    let mut p = pattern.split('.');
    let mut w = wanted.split('.');
    loop {
        match (p.next(), w.next()) {
            (Some(">"), Some(_)) => return true,
            (Some(_), Some(">")) => return false,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert_eq!(sanitize_token("fork"), "fork");
        assert_eq!(sanitize_token("a.b*c>d e\tf"), "a_b_c_d_e_f");
        assert_eq!(sanitize_token(""), "_");
    }

    #[test]
    fn coverage() {
        let w = "cnbus.events.>";
        assert!(subject_covers("cnbus.events.>", w));
        assert!(subject_covers("cnbus.>", w));
        assert!(subject_covers(">", w));
        assert!(!subject_covers("cnbus.events.*", w));
        assert!(!subject_covers("cnbus.events.host.>", w));
        assert!(!subject_covers("other.>", w));
        assert!(!subject_covers("cnbus.events", w));
        assert!(subject_covers("*.events.>", w));
    }
}
