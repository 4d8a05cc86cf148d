//! A fast path for the common shape of `when` conditions: comparisons of
//! variable fields with literals, joined by `&&`, `||`, `!`, and `has()`.
//!
//! Such conditions are evaluated directly on the [`CallContext`] (no CEL
//! values are built). The fast path only answers when it is *certain* to agree
//! with the CEL interpreter: same-type scalar comparisons and boolean logic on
//! booleans. Anything else at run time (a missing key, a type mismatch, a
//! cross-type number comparison, NaN) makes it return `None`, and the engine
//! evaluates the condition with CEL, which produces the exact result or error.
//! A property test checks the two agree.

use super::CallContext;
use cel::common::ast::{Expr, IdedExpr, LiteralValue};
use std::cmp::Ordering;

/// A condition compiled for the fast path.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fast {
    /// A literal.
    Lit(Lit),
    /// A field path rooted at a variable (`args.a.b`, `time.hour`, `tool`).
    Path(Vec<String>),
    /// `has(path)`: the last segment is tested.
    Has(Vec<String>),
    /// Comparison.
    Cmp(Op, Box<Fast>, Box<Fast>),
    /// `a && b`.
    And(Box<Fast>, Box<Fast>),
    /// `a || b`.
    Or(Box<Fast>, Box<Fast>),
    /// `!a`.
    Not(Box<Fast>),
    /// Any other expression: only CEL can evaluate it. Kept so that
    /// `fast && other` can still be decided when `fast` is false (CEL
    /// evaluates `&&` / `||` left to right and stops there too).
    Opaque,
    /// `s.contains(t)`, `s.startsWith(t)`, `s.endsWith(t)` on strings.
    Str(StrOp, Box<Fast>, Box<Fast>),
}

/// A string method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StrOp {
    /// `contains`
    Contains,
    /// `startsWith`
    StartsWith,
    /// `endsWith`
    EndsWith,
}

/// A literal value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Lit {
    /// int.
    Int(i64),
    /// double.
    Float(f64),
    /// string.
    Str(String),
    /// bool.
    Bool(bool),
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// ==
    Eq,
    /// !=
    Ne,
    /// <
    Lt,
    /// <=
    Le,
    /// >
    Gt,
    /// >=
    Ge,
}

/// A value seen by the fast path.
#[derive(Debug, Clone, PartialEq)]
enum V<'a> {
    Int(i64),
    Float(f64),
    Str(&'a str),
    Bool(bool),
    Null,
    Json(&'a serde_json::Value),
}

const VARS: &[&str] = &[
    "agent",
    "process",
    "server",
    "method",
    "tool",
    "args",
    "time",
    "credential",
    "tool_pin",
];

impl Fast {
    /// Compile an AST for the fast path, or None when it has another shape.
    pub(crate) fn compile(e: &IdedExpr) -> Option<Fast> {
        match &e.expr {
            Expr::Literal(l) => Some(Fast::Lit(match l {
                LiteralValue::Int(i) => Lit::Int(*i.inner()),
                LiteralValue::Double(d) => Lit::Float(*d.inner()),
                LiteralValue::String(s) => Lit::Str(s.inner().to_string()),
                LiteralValue::Boolean(b) => Lit::Bool(*b.inner()),
                _ => return None,
            })),
            Expr::Ident(_) | Expr::Select(_) => {
                let (path, test) = path_of(e)?;
                Some(if test {
                    Fast::Has(path)
                } else {
                    Fast::Path(path)
                })
            }
            Expr::Call(c) if c.target.is_some() => {
                let op = match c.func_name.as_str() {
                    "contains" => StrOp::Contains,
                    "startsWith" => StrOp::StartsWith,
                    "endsWith" => StrOp::EndsWith,
                    _ => return None,
                };
                match (c.target.as_deref(), c.args.as_slice()) {
                    (Some(t), [a]) => Some(Fast::Str(
                        op,
                        Box::new(Fast::compile(t)?),
                        Box::new(Fast::compile(a)?),
                    )),
                    _ => None,
                }
            }
            Expr::Call(c) if c.target.is_none() => {
                let op = match c.func_name.as_str() {
                    "_==_" => Some(Op::Eq),
                    "_!=_" => Some(Op::Ne),
                    "_<_" => Some(Op::Lt),
                    "_<=_" => Some(Op::Le),
                    "_>_" => Some(Op::Gt),
                    "_>=_" => Some(Op::Ge),
                    _ => None,
                };
                match (c.func_name.as_str(), c.args.as_slice()) {
                    (_, [a, b]) if op.is_some() => Some(Fast::Cmp(
                        op?,
                        Box::new(Fast::compile(a)?),
                        Box::new(Fast::compile(b)?),
                    )),
                    ("_&&_", [a, b]) => Some(Fast::And(
                        Box::new(Fast::compile(a)?),
                        Box::new(Fast::compile_or_opaque(b)),
                    )),
                    ("_||_", [a, b]) => Some(Fast::Or(
                        Box::new(Fast::compile(a)?),
                        Box::new(Fast::compile_or_opaque(b)),
                    )),
                    ("!_", [a]) => Some(Fast::Not(Box::new(Fast::compile(a)?))),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    fn compile_or_opaque(e: &IdedExpr) -> Fast {
        Fast::compile(e).unwrap_or(Fast::Opaque)
    }

    /// Evaluate to a boolean, or None when only CEL can say.
    pub(crate) fn eval_bool(&self, call: &CallContext, offset: time::UtcOffset) -> Option<bool> {
        match self.eval(call, offset)? {
            V::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// Evaluate to a finite number (budget sums), or None when only CEL can say.
    pub(crate) fn eval_number(&self, call: &CallContext, offset: time::UtcOffset) -> Option<f64> {
        match self.eval(call, offset)? {
            V::Int(i) => Some(i as f64),
            V::Float(f) if f.is_finite() => Some(f),
            _ => None,
        }
    }

    fn eval<'a>(&'a self, call: &'a CallContext, offset: time::UtcOffset) -> Option<V<'a>> {
        match self {
            Fast::Lit(Lit::Int(i)) => Some(V::Int(*i)),
            Fast::Lit(Lit::Float(f)) => Some(V::Float(*f)),
            Fast::Lit(Lit::Str(s)) => Some(V::Str(s)),
            Fast::Lit(Lit::Bool(b)) => Some(V::Bool(*b)),
            Fast::Path(p) => resolve(call, offset, p),
            Fast::Has(p) => {
                let (last, parent) = p.split_last()?;
                if parent.len() < 2 {
                    // has(args.x) on a top-level variable: only args/credential are maps we know.
                    if parent.first().map(String::as_str) != Some("args") {
                        return None;
                    }
                }
                match resolve(call, offset, parent)? {
                    V::Json(serde_json::Value::Object(o)) => Some(V::Bool(o.contains_key(last))),
                    _ => None,
                }
            }
            Fast::Not(a) => match a.eval(call, offset)? {
                V::Bool(b) => Some(V::Bool(!b)),
                _ => None,
            },
            Fast::Opaque => None,
            Fast::Str(op, a, b) => match (a.eval(call, offset)?, b.eval(call, offset)?) {
                (V::Str(x), V::Str(y)) => Some(V::Bool(match op {
                    StrOp::Contains => x.contains(y),
                    StrOp::StartsWith => x.starts_with(y),
                    StrOp::EndsWith => x.ends_with(y),
                })),
                _ => None,
            },
            // Left to right, as the interpreter: a false left side decides `&&`,
            // a true one decides `||`; otherwise both sides must be booleans.
            Fast::And(a, b) => match a.eval(call, offset)? {
                V::Bool(false) => Some(V::Bool(false)),
                V::Bool(true) => match b.eval(call, offset)? {
                    V::Bool(y) => Some(V::Bool(y)),
                    _ => None,
                },
                _ => None,
            },
            Fast::Or(a, b) => match a.eval(call, offset)? {
                V::Bool(true) => Some(V::Bool(true)),
                V::Bool(false) => match b.eval(call, offset)? {
                    V::Bool(y) => Some(V::Bool(y)),
                    _ => None,
                },
                _ => None,
            },
            Fast::Cmp(op, a, b) => {
                let (a, b) = (a.eval(call, offset)?, b.eval(call, offset)?);
                let ord = match (&a, &b) {
                    (V::Int(x), V::Int(y)) => x.cmp(y),
                    (V::Float(x), V::Float(y)) => x.partial_cmp(y)?,
                    (V::Str(x), V::Str(y)) => x.cmp(y),
                    (V::Bool(x), V::Bool(y)) if matches!(op, Op::Eq | Op::Ne) => x.cmp(y),
                    _ => return None,
                };
                Some(V::Bool(match op {
                    Op::Eq => ord == Ordering::Equal,
                    Op::Ne => ord != Ordering::Equal,
                    Op::Lt => ord == Ordering::Less,
                    Op::Le => ord != Ordering::Greater,
                    Op::Gt => ord == Ordering::Greater,
                    Op::Ge => ord != Ordering::Less,
                }))
            }
        }
    }
}

/// `a.b.c` → (["a","b","c"], false); `has(a.b.c)` → (..., true).
fn path_of(e: &IdedExpr) -> Option<(Vec<String>, bool)> {
    let mut segs = Vec::new();
    let mut cur = e;
    let mut test = false;
    loop {
        match &cur.expr {
            Expr::Ident(n) => {
                if !VARS.contains(&n.as_str()) {
                    return None;
                }
                segs.push(n.clone());
                segs.reverse();
                return Some((segs, test));
            }
            Expr::Select(s) => {
                if s.test {
                    if !std::ptr::eq(cur, e) {
                        return None;
                    }
                    test = true;
                }
                segs.push(s.field.clone());
                cur = &s.operand;
            }
            _ => return None,
        }
    }
}

fn json<'a>(v: &'a serde_json::Value) -> V<'a> {
    match v {
        serde_json::Value::Null => V::Null,
        serde_json::Value::Bool(b) => V::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => V::Int(i),
            None => match n.as_f64() {
                Some(f) => V::Float(f),
                None => V::Json(v),
            },
        },
        serde_json::Value::String(s) => V::Str(s),
        _ => V::Json(v),
    }
}

fn resolve<'a>(call: &'a CallContext, offset: time::UtcOffset, path: &[String]) -> Option<V<'a>> {
    let (root, rest) = path.split_first()?;
    let mut cur = match (root.as_str(), rest.first().map(String::as_str)) {
        ("args", _) => json(call.args_for_conditions()),
        ("credential", _) => match &call.credential {
            Some(c) => json(c),
            None => V::Null,
        },
        ("server", None) => V::Str(&call.server),
        ("method", None) => V::Str(&call.method),
        ("tool_pin", None) => V::Str(call.tool_pin.as_str()),
        ("tool", None) => match &call.tool {
            Some(t) => V::Str(t),
            None => V::Null,
        },
        ("agent", Some(f)) if rest.len() == 1 => match f {
            "name" => V::Str(&call.agent.name),
            "owner" => match &call.agent.owner {
                Some(o) => V::Str(o),
                None => V::Null,
            },
            "orphaned" => V::Bool(call.agent.orphaned),
            _ => return None,
        },
        ("process", Some(f)) if rest.len() == 1 => match f {
            "pid" => V::Int(i64::from(call.process.pid)),
            "uid" => V::Int(i64::from(call.process.uid)),
            "gid" => V::Int(i64::from(call.process.gid)),
            "exe" => V::Str(&call.process.exe),
            "comm" => V::Str(&call.process.comm),
            "cgroup" => V::Str(&call.process.cgroup),
            _ => return None,
        },
        ("time", Some(f)) if rest.len() == 1 => {
            let local = call.time.to_offset(offset);
            V::Int(match f {
                "unix" => call.time.unix_timestamp(),
                "hour" => i64::from(local.hour()),
                "minute" => i64::from(local.minute()),
                "weekday" => i64::from(local.weekday().number_from_monday()),
                _ => return None,
            })
        }
        _ => return None,
    };
    if matches!(root.as_str(), "args" | "credential") {
        for seg in rest {
            cur = match cur {
                V::Json(serde_json::Value::Object(o)) => json(o.get(seg)?),
                _ => return None,
            };
        }
    }
    Some(cur)
}
