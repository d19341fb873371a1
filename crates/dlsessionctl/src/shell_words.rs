//! Splitting a command line into words the way a POSIX shell would, without running one
//! (no expansion of variables, globs or substitutions).

/// Why a command line could not be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("unterminated single quote")]
    UnterminatedSingle,
    #[error("unterminated double quote")]
    UnterminatedDouble,
    #[error("trailing backslash")]
    TrailingBackslash,
}

/// Splits `line` into words: blanks separate words; `'…'` is literal; `"…"` is literal
/// except that a backslash escapes `$`, `` ` ``, `"`, `\` and newline; outside quotes a
/// backslash escapes any character (and backslash-newline is removed). `''` is an empty
/// word.
pub fn split(line: &str) -> Result<Vec<String>, SplitError> {
    let mut words = Vec::new();
    let mut word = String::new();
    // A word has started (even an empty quoted one).
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(SplitError::UnterminatedSingle),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some('\n') => {}
                            Some(c @ ('$' | '`' | '"' | '\\')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err(SplitError::UnterminatedDouble),
                        },
                        Some(c) => word.push(c),
                        None => return Err(SplitError::UnterminatedDouble),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => {
                    in_word = true;
                    word.push(c);
                }
                None => return Err(SplitError::TrailingBackslash),
            },
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> Vec<String> {
        split(line).unwrap()
    }

    #[test]
    fn plain_words() {
        assert_eq!(ok("  /usr/bin/app   --background\t-v "), ["/usr/bin/app", "--background", "-v"]);
        assert!(ok("").is_empty());
        assert!(ok("   ").is_empty());
    }

    #[test]
    fn quotes() {
        assert_eq!(ok("app 'a b' \"c d\""), ["app", "a b", "c d"]);
        assert_eq!(ok("a'b'\"c\"d"), ["abcd"]);
        assert_eq!(ok("x '' \"\""), ["x", "", ""]);
        assert_eq!(ok(r#"'it'\''s'"#), ["it's"]);
        assert_eq!(ok(r"'\n$HOME'"), [r"\n$HOME"]);
    }

    #[test]
    fn backslashes() {
        assert_eq!(ok(r"a\ b c"), ["a b", "c"]);
        assert_eq!(ok(r#""a\"b\\c\$d\e""#), [r#"a"b\c$d\e"#]);
        assert_eq!(ok("a\\\nb"), ["ab"]);
        assert_eq!(ok(r"\'x"), ["'x"]);
    }

    #[test]
    fn unbalanced() {
        assert_eq!(split("app 'oops"), Err(SplitError::UnterminatedSingle));
        assert_eq!(split("app \"oops"), Err(SplitError::UnterminatedDouble));
        assert_eq!(split("app \"oops\\"), Err(SplitError::UnterminatedDouble));
        assert_eq!(split("app \\"), Err(SplitError::TrailingBackslash));
    }
}
