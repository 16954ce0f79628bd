//! Redis glob patterns: [`Glob`], parsed with the semantics of Redis' `stringmatchlen` (`*`, `?`,
//! `[abc]`, `[^a-z]`, `\x`), and [`escape`], the one way text is put into a pattern so that it
//! matches only itself. Rules escape row values with it, the matcher the bytes of its superset
//! glob, the index the literal it compares a pattern with, tracking the prefix of its seeding `SCAN`.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Byte(u8),
    AnyByte,
    AnyRun,
    Class {
        negated: bool,
        items: Vec<ClassItem>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ClassItem {
    Byte(u8),
    Range(u8, u8),
}

/// A parsed glob pattern with Redis' `stringmatchlen` semantics: `*`, `?`, `[abc]`, `[^a-z]`, `\x`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    tokens: Vec<Token>,
}

impl Glob {
    pub fn parse(pattern: &str) -> Glob {
        let bytes = pattern.as_bytes();
        // A token per byte at most: one allocation instead of a growth per doubling, which was
        // a visible share of the daemon's CPU when each window's patterns are parsed.
        let mut tokens = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'*' => {
                    // Consecutive stars match the same as one.
                    if tokens.last() != Some(&Token::AnyRun) {
                        tokens.push(Token::AnyRun);
                    }
                }
                b'?' => tokens.push(Token::AnyByte),
                b'\\' if i + 1 < bytes.len() => {
                    i += 1;
                    tokens.push(Token::Byte(bytes[i]));
                }
                b'[' => {
                    i += 1;
                    let negated = bytes.get(i) == Some(&b'^');
                    if negated {
                        i += 1;
                    }
                    let mut items = Vec::new();
                    while i < bytes.len() && bytes[i] != b']' {
                        if bytes[i] == b'\\' && i + 1 < bytes.len() {
                            i += 1;
                            items.push(ClassItem::Byte(bytes[i]));
                        } else if i + 2 < bytes.len()
                            && bytes[i + 1] == b'-'
                            && bytes[i + 2] != b']'
                        {
                            let (a, b) = (bytes[i], bytes[i + 2]);
                            items.push(ClassItem::Range(a.min(b), a.max(b)));
                            i += 2;
                        } else {
                            items.push(ClassItem::Byte(bytes[i]));
                        }
                        i += 1;
                    }
                    // Like Redis, an unterminated class ends at the end of the pattern.
                    tokens.push(Token::Class { negated, items });
                }
                byte => tokens.push(Token::Byte(byte)),
            }
            i += 1;
        }
        Glob { tokens }
    }

    /// The literal bytes every match starts with.
    pub fn literal_prefix(&self) -> Vec<u8> {
        self.tokens
            .iter()
            .map_while(|token| match token {
                Token::Byte(byte) => Some(*byte),
                _ => None,
            })
            .collect()
    }

    pub fn is_match(&self, key: &[u8]) -> bool {
        matches_from(&self.tokens, key)
    }

    /// How the glob begins, which decides how the matcher can look it up.
    pub(crate) fn layout(&self) -> Layout {
        let literal = self.literal_prefix();
        let rest = &self.tokens[literal.len()..];
        match rest {
            [] => return Layout::Exact(literal),
            [Token::AnyRun] => return Layout::Prefix(literal),
            _ => {}
        }
        let [Token::AnyRun, after_star @ ..] = rest else {
            return Layout::Other;
        };
        let run: Vec<u8> = after_star
            .iter()
            .map_while(|token| match token {
                Token::Byte(byte) => Some(*byte),
                _ => None,
            })
            .collect();
        let only_star_after = after_star[run.len()..] == [Token::AnyRun];
        Layout::StarThenLiteral {
            prefix: literal,
            run,
            only_star_after,
        }
    }
}

/// The layout of `pattern` when it is a literal, or a literal and `*` at its end (almost every
/// pattern the rules render), read without building its tokens: `None` for any other pattern,
/// which [`Glob::parse`] and [`Glob::layout`] handle. The same answer as theirs, in a scan of the
/// bytes: under load every pattern is looked at several times (the lookup, the coverage check,
/// the refill guard), and parsing it each time was a visible share of the daemon's CPU.
pub(crate) fn simple_layout(pattern: &str) -> Option<Layout> {
    let bytes = pattern.as_bytes();
    let mut literal = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if i + 1 < bytes.len() => {
                i += 1;
                literal.push(bytes[i]);
            }
            // Stars up to the end match as one.
            b'*' => {
                return bytes[i..]
                    .iter()
                    .all(|&byte| byte == b'*')
                    .then_some(Layout::Prefix(literal))
            }
            b'?' | b'[' => return None,
            byte => literal.push(byte),
        }
        i += 1;
    }
    Some(Layout::Exact(literal))
}

/// [`Glob::layout`] of `pattern`, parsed only when it is not a literal or a literal and `*`.
pub(crate) fn layout_of(pattern: &str) -> Layout {
    simple_layout(pattern).unwrap_or_else(|| Glob::parse(pattern).layout())
}

/// [`Glob::literal_prefix`] of `pattern`, parsed only when it is not a literal or a literal and
/// `*`.
pub fn literal_prefix_of(pattern: &str) -> Vec<u8> {
    match simple_layout(pattern) {
        Some(Layout::Exact(literal) | Layout::Prefix(literal)) => literal,
        _ => Glob::parse(pattern).literal_prefix(),
    }
}

/// How a glob begins: see [`Glob::layout`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// No wildcard at all: matches this text only.
    Exact(Vec<u8>),
    /// A literal prefix and one `*`.
    Prefix(Vec<u8>),
    /// A literal prefix, `*`, then the literal `run` up to the next wildcard (or the end);
    /// `only_star_after`: the pattern ends with one `*` right after the run.
    StarThenLiteral {
        prefix: Vec<u8>,
        run: Vec<u8>,
        only_star_after: bool,
    },
    /// A wildcard other than `*` right after the literal prefix.
    Other,
}

/// The characters a Redis glob treats specially: `*`, `?`, `[`, `]` and `\` anywhere, `^` and `-`
/// inside a class. Escaping all of them everywhere is harmless: a `\` makes any byte literal.
fn is_special(byte: u8) -> bool {
    matches!(byte, b'*' | b'?' | b'[' | b']' | b'\\' | b'^' | b'-')
}

/// Appends `text` to the glob being built in `out`, each special byte escaped, so that this part of
/// the pattern matches exactly `text` (also inside a `[…]` class, byte by byte).
pub fn escape_into(out: &mut Vec<u8>, text: &[u8]) {
    for &byte in text {
        if is_special(byte) {
            out.push(b'\\');
        }
        out.push(byte);
    }
}

/// `text` as a glob that matches only itself.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        // Every special character is ASCII, so escaping by `char` is escaping by byte.
        if c.is_ascii() && is_special(c as u8) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// Redis' `stringmatchlen` without its recursion: each non-star token consumes exactly one byte,
/// so on a mismatch it is enough to let the last `*` seen swallow one more byte and retry from
/// just after it (earlier stars never need to take more: the last one can absorb whatever they
/// would). Worst case keys × tokens steps; the recursive form was exponential in the number of
/// stars (`a*a*a*a*a*a*a*a*b` against 40 `a`s did not finish).
fn matches_from(tokens: &[Token], key: &[u8]) -> bool {
    let (mut token, mut at) = (0, 0);
    // Token index after the last `*` seen, and the key position that star's match ends at.
    let mut last_star: Option<(usize, usize)> = None;
    loop {
        match tokens.get(token) {
            Some(Token::AnyRun) => {
                if token + 1 == tokens.len() {
                    return true;
                }
                last_star = Some((token + 1, at));
                token += 1;
                continue;
            }
            Some(single) if key.get(at).is_some_and(|&byte| single.matches_byte(byte)) => {
                token += 1;
                at += 1;
                continue;
            }
            Some(_) => {}
            None if at == key.len() => return true,
            None => {}
        }
        // A mismatch: the last star takes one more byte, or there is no way to match.
        match last_star {
            Some((after_star, star_end)) if star_end < key.len() => {
                last_star = Some((after_star, star_end + 1));
                token = after_star;
                at = star_end + 1;
            }
            _ => return false,
        }
    }
}

impl Token {
    /// Whether this one-byte token (anything but `*`) accepts `byte`.
    fn matches_byte(&self, byte: u8) -> bool {
        match self {
            Token::Byte(expected) => *expected == byte,
            Token::AnyByte => true,
            Token::Class { negated, items } => {
                let inside = items.iter().any(|item| match *item {
                    ClassItem::Byte(b) => b == byte,
                    ClassItem::Range(low, high) => (low..=high).contains(&byte),
                });
                inside != *negated
            }
            Token::AnyRun => true,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every pattern of up to four bytes over the bytes that matter: the scan answers as the
    /// parser does, or leaves the pattern to it.
    #[test]
    fn the_simple_layout_agrees_with_the_parser() {
        let alphabet = [b'a', b'*', b'?', b'[', b']', b'\\', b'^', b'-'];
        let mut patterns: Vec<Vec<u8>> = vec![Vec::new()];
        let mut last: Vec<Vec<u8>> = vec![Vec::new()];
        for _ in 0..4 {
            last = last
                .iter()
                .flat_map(|p| alphabet.iter().map(move |&b| [p.as_slice(), &[b]].concat()))
                .collect();
            patterns.extend(last.iter().cloned());
        }
        for pattern in patterns {
            let Ok(pattern) = String::from_utf8(pattern) else {
                continue;
            };
            let parsed = Glob::parse(&pattern);
            match simple_layout(&pattern) {
                Some(layout) => assert_eq!(layout, parsed.layout(), "{pattern:?}"),
                None => assert!(
                    !matches!(parsed.layout(), Layout::Exact(_) | Layout::Prefix(_)),
                    "{pattern:?}"
                ),
            }
            assert_eq!(
                literal_prefix_of(&pattern),
                parsed.literal_prefix(),
                "{pattern:?}"
            );
        }
    }

    #[test]
    fn escaped_text_matches_only_itself() {
        for text in ["a*b", "x?", "[ab]", "a\\b", "^-", "plain:1:"] {
            let glob = Glob::parse(&escape(text));
            assert!(glob.is_match(text.as_bytes()), "{text:?}");
            assert_eq!(glob.literal_prefix(), text.as_bytes(), "{text:?}");
        }
        let mut class = b"[".to_vec();
        escape_into(&mut class, b"^-]");
        class.push(b']');
        let class = Glob::parse(std::str::from_utf8(&class).expect("ascii"));
        for byte in [b'^', b'-', b']'] {
            assert!(class.is_match(&[byte]), "{}", byte as char);
        }
        assert!(!class.is_match(b"a"));
    }

    #[test]
    fn general_globs_follow_redis_semantics() {
        let g = Glob::parse("h[ae]llo?[^0-9]x[a-c]");
        assert!(g.is_match(b"hallo1zxb"));
        assert!(!g.is_match(b"hillo1zxb"));
        assert!(!g.is_match(b"hallo15xb"));
        assert!(!g.is_match(b"hallo1zxd"));
        assert!(Glob::parse("*").is_match(b""));
        assert!(Glob::parse("a**b").is_match(b"ab"));
    }

    #[test]
    fn many_stars_match_in_linear_time() {
        // The recursive matcher tried every way to split the `a`s among the stars: this did not
        // finish. Now it is a few thousand steps.
        let started = std::time::Instant::now();
        let key = [b'a'; 40];
        assert!(!Glob::parse("a*a*a*a*a*a*a*a*b").is_match(&key));
        assert!(Glob::parse("a*a*a*a*a*a*a*a*a").is_match(&key));
        let many = "*a".repeat(30) + "*b";
        assert!(!Glob::parse(&many).is_match(&[b'a'; 200]));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }

    /// Redis' `stringmatchlen` as it is written (recursive on `*`), to check the linear matcher
    /// against on small inputs.
    fn reference_match(tokens: &[Token], key: &[u8]) -> bool {
        let Some((token, rest)) = tokens.split_first() else {
            return key.is_empty();
        };
        match token {
            Token::AnyRun => (0..=key.len()).any(|skip| reference_match(rest, &key[skip..])),
            single => {
                key.first().is_some_and(|&byte| single.matches_byte(byte))
                    && reference_match(rest, &key[1..])
            }
        }
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    pub(crate) struct Bytes(pub(crate) u64);

    impl Bytes {
        pub(crate) fn next(&mut self, below: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % below as u64) as usize
        }

        pub(crate) fn text(&mut self, pieces: &[&str], max: usize) -> String {
            let len = self.next(max + 1);
            (0..len).map(|_| pieces[self.next(pieces.len())]).collect()
        }
    }

    #[test]
    fn the_linear_matcher_agrees_with_redis_recursive_one() {
        let mut random = Bytes(0x9e37_79b9_7f4a_7c15);
        let pattern_pieces = ["a", "b", ":", "*", "?", "[ab]", "[^a]", "\\*", "**"];
        let key_pieces = ["a", "b", ":", "*", "c"];
        for _ in 0..20_000 {
            let pattern = random.text(&pattern_pieces, 7);
            let key = random.text(&key_pieces, 9);
            let glob = Glob::parse(&pattern);
            assert_eq!(
                glob.is_match(key.as_bytes()),
                reference_match(&glob.tokens, key.as_bytes()),
                "{pattern:?} against {key:?}"
            );
        }
    }
}
