//! `#[ledger_testdb::test]` (re-exported there): a `#[test]` whose body runs
//! under a deadline. A test that hangs fails with its name and what it was waiting
//! for, instead of stalling the whole run without a word.
//!
//! ```ignore
//! use ledger_testdb as testing;
//!
//! #[testing::test]          // the default deadline (see `testing::deadline`)
//! fn transfers_never_deadlock() { /* ... */ }
//!
//! #[testing::test(600)]     // a longer one, in seconds
//! fn a_long_soak() { /* ... */ }
//! ```
//!
//! No syn/quote: the item is a plain `fn name() [-> T] { body }`; the body block is
//! handed, untouched (spans and all), to `ledger_testdb::deadline::run`.

use proc_macro::{Delimiter, Group, TokenStream, TokenTree};

#[proc_macro_attribute]
pub fn test(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand(attr, item) {
        Ok(out) => out,
        Err(message) => format!("compile_error!({message:?});").parse().expect("a compile_error! invocation"),
    }
}

fn expand(attr: TokenStream, item: TokenStream) -> Result<TokenStream, String> {
    let seconds = deadline_seconds(attr)?;
    let mut tokens: Vec<TokenTree> = item.into_iter().collect();
    let name = test_name(&tokens)?;
    let body = match tokens.pop() {
        Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Brace => g,
        _ => return Err("#[testing::test] goes on a function with a body".into()),
    };

    // ::ledger_testdb::deadline::run(concat!(module_path!(), "::name"), seconds, move || body)
    let mut args: TokenStream = format!("::core::concat!(::core::module_path!(), \"::{name}\"), {seconds}, move ||")
        .parse()
        .map_err(|e| format!("{e:?}"))?;
    args.extend([TokenTree::Group(body)]);
    let mut call: TokenStream = "::ledger_testdb::deadline::run".parse().map_err(|e| format!("{e:?}"))?;
    call.extend([TokenTree::Group(Group::new(Delimiter::Parenthesis, args))]);

    let mut out: TokenStream = "#[::core::prelude::v1::test]".parse().map_err(|e| format!("{e:?}"))?;
    out.extend(tokens);
    out.extend([TokenTree::Group(Group::new(Delimiter::Brace, call))]);
    Ok(out)
}

/// `#[testing::test]` -> the default (0 means "the harness's default");
/// `#[testing::test(600)]` -> 600 seconds.
fn deadline_seconds(attr: TokenStream) -> Result<u64, String> {
    let attr: Vec<TokenTree> = attr.into_iter().collect();
    match attr.as_slice() {
        [] => Ok(0),
        [TokenTree::Literal(lit)] => lit
            .to_string()
            .trim_end_matches("u64")
            .replace('_', "")
            .parse::<u64>()
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| format!("#[testing::test({lit})]: the deadline is a positive number of seconds")),
        _ => Err("#[testing::test] takes nothing or a deadline in seconds, like #[testing::test(600)]".into()),
    }
}

fn test_name(tokens: &[TokenTree]) -> Result<String, String> {
    let at_fn = tokens
        .iter()
        .position(|t| matches!(t, TokenTree::Ident(i) if i.to_string() == "fn"))
        .ok_or("#[testing::test] goes on a function")?;
    match tokens.get(at_fn + 1) {
        Some(TokenTree::Ident(name)) => Ok(name.to_string()),
        _ => Err("#[testing::test]: expected the function's name after `fn`".into()),
    }
}
