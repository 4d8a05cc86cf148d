//! CEL conditions (`when`, budget `sum`): compiled and validated once at load,
//! evaluated per call.
//!
//! Validation walks the parsed AST against the variables kya defines (and the
//! fields of the structured ones), comprehension variables in scope, and an
//! allow-list of functions that are known to work in the `cel` crate, so a
//! typo (`arg.amount`, `time.hours`, `sizee(x)`) is a load-time error instead
//! of a rule that silently fails closed on every call.

use super::CallContext;
use cel::common::ast::{EntryExpr, Expr, IdedExpr};
use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString,
};
use cel::common::value::Val;
use cel::{Context, Env, Program, Value};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// Top-level variables and, for the structured ones, their fields.
const VARIABLES: &[(&str, Option<&[&str]>)] = &[
    ("agent", Some(&["name", "owner", "orphaned"])),
    (
        "process",
        Some(&[
            "pid",
            "uid",
            "gid",
            "exe",
            "comm",
            "cgroup",
            "container",
            "netns",
        ]),
    ),
    ("server", None),
    ("destination", Some(&["ip", "port"])),
    ("method", None),
    ("tool", None),
    ("args", None),
    ("time", Some(&["unix", "hour", "minute", "weekday"])),
    ("credential", None),
    ("tool_pin", None),
];

/// Functions and methods a condition may call (operators, which the parser
/// names `_op_`, `!_`, `-_` or `@...`, are always allowed).
const FUNCTIONS: &[&str] = &[
    "size",
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "int",
    "uint",
    "double",
    "string",
    "bool",
    "type",
    "dyn",
    "has",
    "all",
    "exists",
    "exists_one",
    "map",
    "filter",
];

/// Longest accepted CEL source, in bytes. Conditions are written by people;
/// the bound keeps parsing and evaluation of hostile input cheap.
pub(crate) const MAX_CEL_LEN: usize = 4 * 1024;
/// Deepest bracket nesting accepted before parsing: the parser recurses per
/// level and would overflow the stack on thousands of `((((`.
pub(crate) const MAX_NESTING: usize = 32;
/// Deepest expression tree accepted (evaluation recurses per level, and may
/// run on a 2 MiB tokio worker stack).
pub(crate) const MAX_AST_DEPTH: usize = 96;
/// Stack of the compiler thread.
const COMPILE_STACK: usize = 256 * 1024 * 1024;

fn env() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Env::stdlib();
        // `matches` with compiled patterns cached (the crate's own compiles the
        // regex on every evaluation, ~150 µs); the crate's is not built in.
        let added = cel::add_overload!(env, fn cached_matches: (CelString, CelString) -> Result<CelBool>,
            name = "matches", id = "matches")
        .and_then(|_| {
            cel::add_member_overload!(env, fn cached_matches: (CelString, CelString) -> Result<CelBool>,
                name = "matches")
        });
        if let Err(e) = added {
            // Then `matches` is unknown to the environment: rules using it are
            // refused at load with a clear error, never silently wrong.
            tracing::error!(error = ?e, "cannot register CEL matches()");
        }
        Arc::new(env)
    })
}

/// Compiled `matches()` patterns. Patterns in rules are literals (checked at
/// load), so the set is small; it is bounded anyway (cleared when full).
const MAX_CACHED_REGEXES: usize = 1024;

fn cached_matches(
    this: &CelString<'_>,
    re: &CelString<'_>,
) -> Result<CelBool, cel::ExecutionError> {
    static CACHE: OnceLock<std::sync::Mutex<HashMap<String, regex::Regex>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let pattern = re.inner();
    let found = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(pattern)
        .cloned();
    let compiled = match found {
        Some(r) => r,
        None => {
            let r =
                regex::Regex::new(pattern).map_err(|err| cel::ExecutionError::FunctionError {
                    function: "matches".to_string(),
                    message: format!("'{pattern}' not a valid regex:\n{err}"),
                })?;
            let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= MAX_CACHED_REGEXES {
                map.clear();
            }
            map.insert(pattern.to_owned(), r.clone());
            r
        }
    };
    Ok(CelBool::from(compiled.is_match(this.inner())))
}

/// A compiled, validated CEL expression.
#[derive(Debug)]
pub struct Condition {
    source: String,
    program: Program,
    /// The same condition for the fast path, when it has that shape.
    fast: Option<super::fast::Fast>,
    /// Which top-level variables it reads (bit i = `VARIABLES[i]`), so a
    /// decision converts only those to CEL values.
    vars: VarMask,
}

/// A set of top-level variables (bit i = `VARIABLES[i]`).
pub(crate) type VarMask = u16;

/// Every variable.
pub(crate) const ALL_VARS: VarMask = (1 << VARIABLES.len()) - 1;

fn var_bit(name: &str) -> VarMask {
    VARIABLES
        .iter()
        .position(|(n, _)| *n == name)
        .map(|i| 1 << i)
        .unwrap_or(0)
}

impl Condition {
    /// Parse and validate `source`. The error is a one-line message.
    pub fn compile(source: &str) -> Result<Condition, String> {
        if source.trim().is_empty() {
            return Err("empty CEL expression".to_string());
        }
        if source.len() > MAX_CEL_LEN {
            return Err(format!("CEL expression longer than {MAX_CEL_LEN} bytes"));
        }
        let nesting = max_nesting(source);
        if nesting > MAX_NESTING {
            return Err(format!(
                "CEL expression nests brackets {nesting} deep (at most {MAX_NESTING})"
            ));
        }
        // Parse and validate on a thread with a large stack: the ANTLR parser
        // recurses several frames per nesting level, which a 2 MiB tokio
        // worker (reloads run there) cannot afford for legitimate nesting.
        // Compiling happens at load time only, so a thread per condition is cheap.
        let owned = source.to_string();
        let compiled = std::thread::Builder::new()
            .name("kya-cel-compile".into())
            .stack_size(COMPILE_STACK)
            .spawn(move || Condition::compile_here(&owned))
            .map_err(|e| format!("cannot start the CEL compiler thread: {e}"))?;
        compiled
            .join()
            .map_err(|_| "the CEL compiler failed on this expression".to_string())?
    }

    fn compile_here(source: &str) -> Result<Condition, String> {
        let program = env().compile(source).map_err(|e| {
            let msg = e
                .errors
                .iter()
                .take(2)
                .map(|e| format!("{} (column {})", e.msg, e.pos.1 + 1))
                .collect::<Vec<_>>()
                .join("; ");
            format!("CEL does not parse: {msg}")
        })?;
        let mut scope = Vec::new();
        let mut vars = 0;
        validate(program.expression(), &mut scope, 0, &mut vars)?;
        let fast = super::fast::Fast::compile(program.expression());
        Ok(Condition {
            source: source.to_string(),
            program,
            fast,
            vars,
        })
    }

    /// The fast-path answer, when the fast path is certain (see [`super::fast`]).
    pub fn fast_bool(&self, call: &CallContext, offset: time::UtcOffset) -> Option<bool> {
        self.fast.as_ref()?.eval_bool(call, offset)
    }

    /// The fast-path number (budget sums), when the fast path is certain.
    pub fn fast_number(&self, call: &CallContext, offset: time::UtcOffset) -> Option<f64> {
        self.fast.as_ref()?.eval_number(call, offset)
    }

    /// Does the condition have a fast-path form?
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// The variables it reads.
    pub fn vars(&self) -> VarMask {
        self.vars
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluate to a value; any runtime failure is an error string that
    /// names types, never values ([`describe`]).
    pub fn eval(&self, act: &Activation) -> Result<Value, String> {
        self.program.execute(&act.ctx).map_err(|e| describe(&e))
    }

    /// Evaluate to a boolean; a non-boolean result is an error.
    pub fn eval_bool(&self, act: &Activation) -> Result<bool, String> {
        match self.eval(act)? {
            Value::Bool(b) => Ok(b),
            other => Err(format!(
                "condition evaluated to {}, not a bool",
                other.type_of()
            )),
        }
    }

    /// Evaluate to a number (for budget sums); ints and doubles are accepted.
    pub fn eval_number(&self, act: &Activation) -> Result<f64, String> {
        match self.eval(act)? {
            Value::Int(i) => Ok(i as f64),
            Value::UInt(u) => Ok(u as f64),
            Value::Float(f) if f.is_finite() => Ok(f),
            Value::Float(_) => Err("sum evaluated to a non-finite number".to_string()),
            other => Err(format!(
                "sum evaluated to {}, not a number",
                other.type_of()
            )),
        }
    }
}

/// Deepest nesting of `(`, `[`, `{` outside string literals.
fn max_nesting(src: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in src.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => quote = Some(c),
            '(' | '[' | '{' => {
                depth += 1;
                max = max.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

fn validate(
    e: &IdedExpr,
    scope: &mut Vec<String>,
    depth: usize,
    vars: &mut VarMask,
) -> Result<(), String> {
    if depth > MAX_AST_DEPTH {
        return Err(format!(
            "CEL expression is nested more than {MAX_AST_DEPTH} levels deep"
        ));
    }
    let d = depth + 1;
    match &e.expr {
        Expr::Unspecified | Expr::Literal(_) => Ok(()),
        Expr::Ident(name) => {
            check_ident(name, scope)?;
            if !scope.iter().any(|s| s == name) {
                *vars |= var_bit(name);
            }
            Ok(())
        }
        Expr::Select(sel) => {
            // A field of a structured variable must exist (unless shadowed).
            if let Expr::Ident(root) = &sel.operand.expr {
                if !scope.iter().any(|s| s == root) {
                    if let Some((_, Some(fields))) = VARIABLES.iter().find(|(n, _)| n == root) {
                        if !fields.contains(&sel.field.as_str()) {
                            return Err(format!(
                                "unknown field {root}.{} (known: {})",
                                sel.field,
                                fields.join(", ")
                            ));
                        }
                    }
                }
            }
            validate(&sel.operand, scope, d, vars)
        }
        Expr::Call(call) => {
            let f = call.func_name.as_str();
            let operator = f.starts_with('_') || f.starts_with('@') || f == "!_" || f == "-_";
            if !operator && !FUNCTIONS.contains(&f) {
                return Err(format!("unknown function {f}()"));
            }
            if f == "matches" {
                check_regex_literal(call.target.is_some(), &call.args)?;
            }
            if let Some(t) = &call.target {
                validate(t, scope, d, vars)?;
            }
            call.args
                .iter()
                .try_for_each(|a| validate(a, scope, d, vars))
        }
        Expr::List(list) => list
            .elements
            .iter()
            .try_for_each(|a| validate(a, scope, d, vars)),
        Expr::Map(map) => map.entries.iter().try_for_each(|en| match &en.expr {
            EntryExpr::StructField(f) => validate(&f.value, scope, d, vars),
            EntryExpr::MapEntry(m) => {
                validate(&m.key, scope, d, vars)?;
                validate(&m.value, scope, d, vars)
            }
        }),
        Expr::Struct(s) => Err(format!(
            "message construction {} {{...}} is not supported",
            s.type_name
        )),
        Expr::Comprehension(c) => {
            validate(&c.iter_range, scope, d, vars)?;
            validate(&c.accu_init, scope, d, vars)?;
            let depth = scope.len();
            scope.push(c.iter_var.clone());
            if let Some(v) = &c.iter_var2 {
                scope.push(v.clone());
            }
            scope.push(c.accu_var.clone());
            let r = validate(&c.loop_cond, scope, d, vars)
                .and_then(|_| validate(&c.loop_step, scope, d, vars))
                .and_then(|_| validate(&c.result, scope, d, vars));
            scope.truncate(depth);
            r
        }
    }
}

/// A `matches` pattern written as a literal must be a valid regex: better a
/// load-time error than a rule that fails closed on every call.
fn check_regex_literal(member: bool, args: &[IdedExpr]) -> Result<(), String> {
    use cel::common::ast::LiteralValue;
    let pattern = if member { args.first() } else { args.get(1) };
    if let Some(IdedExpr {
        expr: Expr::Literal(LiteralValue::String(s)),
        ..
    }) = pattern
    {
        regex::Regex::new(s.inner()).map_err(|e| {
            format!(
                "matches(): invalid regex {:?}: {}",
                s.inner(),
                e.to_string().lines().last().unwrap_or_default()
            )
        })?;
    }
    Ok(())
}

fn check_ident(name: &str, scope: &[String]) -> Result<(), String> {
    if scope.iter().any(|s| s == name) || VARIABLES.iter().any(|(n, _)| *n == name) {
        return Ok(());
    }
    // Type names (`type(x) == int`) and literals the parser may surface as identifiers.
    if matches!(
        name,
        "null"
            | "true"
            | "false"
            | "int"
            | "uint"
            | "double"
            | "string"
            | "bool"
            | "bytes"
            | "list"
            | "map"
            | "null_type"
            | "type"
    ) {
        return Ok(());
    }
    let known: Vec<&str> = VARIABLES.iter().map(|(n, _)| *n).collect();
    Err(format!(
        "unknown variable {name:?} (known: {})",
        known.join(", ")
    ))
}

/// The variables of one call as CEL values, built once per decision and only
/// for the variables the candidate conditions read. Strings borrow from the
/// call (no copies of the arguments).
pub struct Activation<'a> {
    ctx: Context<'a, 'a>,
}

impl<'a> Activation<'a> {
    /// Every variable of `call`, with `time` in the policy's timezone offset.
    pub fn new(call: &'a CallContext, offset: time::UtcOffset) -> Activation<'a> {
        Activation::with_vars(call, offset, ALL_VARS)
    }

    /// Only the variables in `mask`.
    pub fn with_vars(
        call: &'a CallContext,
        offset: time::UtcOffset,
        mask: VarMask,
    ) -> Activation<'a> {
        let mut ctx = Context::with_env(env().clone());
        let want = |name: &str| mask & var_bit(name) != 0;
        if want("agent") {
            let owner: Box<dyn Val + 'a> = match call.agent.owner.as_deref() {
                Some(o) => Box::new(CelString::from(o)),
                None => Box::new(CelNull),
            };
            ctx.add_variable_as_val(
                "agent",
                map(vec![
                    ("name", Box::new(CelString::from(call.agent.name.as_str()))),
                    ("owner", owner),
                    ("orphaned", Box::new(CelBool::from(call.agent.orphaned))),
                ]),
            );
        }
        if want("process") {
            let p = &call.process;
            ctx.add_variable_as_val(
                "process",
                map(vec![
                    ("pid", Box::new(CelInt::from(i64::from(p.pid)))),
                    ("uid", Box::new(CelInt::from(i64::from(p.uid)))),
                    ("gid", Box::new(CelInt::from(i64::from(p.gid)))),
                    ("exe", Box::new(CelString::from(p.exe.as_str()))),
                    ("comm", Box::new(CelString::from(p.comm.as_str()))),
                    ("cgroup", Box::new(CelString::from(p.cgroup.as_str()))),
                    ("container", container_val(p.container.as_ref())),
                    ("netns", Box::new(CelInt::from(p.netns as i64))),
                ]),
            );
        }
        if want("time") {
            let local = call.time.to_offset(offset);
            ctx.add_variable_as_val(
                "time",
                map(vec![
                    ("unix", Box::new(CelInt::from(call.time.unix_timestamp()))),
                    ("hour", Box::new(CelInt::from(i64::from(local.hour())))),
                    ("minute", Box::new(CelInt::from(i64::from(local.minute())))),
                    (
                        "weekday",
                        Box::new(CelInt::from(i64::from(
                            local.weekday().number_from_monday(),
                        ))),
                    ),
                ]),
            );
        }
        if want("server") {
            ctx.add_variable_as_val("server", Box::new(CelString::from(call.server.as_str())));
        }
        if want("destination") {
            let dst: Box<dyn Val + 'a> = match call.destination {
                Some(d) => map(vec![
                    ("ip", Box::new(CelString::from(d.ip().to_string()))),
                    ("port", Box::new(CelInt::from(i64::from(d.port())))),
                ]),
                None => Box::new(CelNull),
            };
            ctx.add_variable_as_val("destination", dst);
        }
        if want("method") {
            ctx.add_variable_as_val("method", Box::new(CelString::from(call.method.as_str())));
        }
        if want("tool") {
            let tool: Box<dyn Val + 'a> = match call.tool.as_deref() {
                Some(t) => Box::new(CelString::from(t)),
                None => Box::new(CelNull),
            };
            ctx.add_variable_as_val("tool", tool);
        }
        if want("args") {
            ctx.add_variable_as_val("args", json_val(call.args_for_conditions()));
        }
        if want("tool_pin") {
            ctx.add_variable_as_val(
                "tool_pin",
                Box::new(CelString::from(call.tool_pin.as_str())),
            );
        }
        if want("credential") {
            let cred: Box<dyn Val + 'a> = match &call.credential {
                Some(c) => json_val(c),
                None => Box::new(CelNull),
            };
            ctx.add_variable_as_val("credential", cred);
        }
        Activation { ctx }
    }
}

fn map<'a>(entries: Vec<(&'static str, Box<dyn Val + 'a>)>) -> Box<dyn Val + 'a> {
    let m: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = entries
        .into_iter()
        .map(|(k, v)| (CelMapKey::from(k), v))
        .collect();
    Box::new(CelMap::from(m))
}

/// `process.container`: `id`, `runtime`, `pod_uid`, `pod_namespace` and
/// `pod_name` (the last two from the Kubernetes API), `image` and
/// `image_id` (from the container's engine, once it answered), empty
/// strings for what is unknown and for a process in no container (so `process.container.id == ""` is "not in a
/// container", and a rule on a field never fails to evaluate).
fn container_val<'a>(c: Option<&'a kya_common::ContainerIdentity>) -> Box<dyn Val + 'a> {
    let s =
        |v: Option<&'a str>| -> Box<dyn Val + 'a> { Box::new(CelString::from(v.unwrap_or(""))) };
    map(vec![
        ("id", s(c.map(|c| c.id.as_str()))),
        ("runtime", s(c.map(|c| c.runtime.as_str()))),
        ("pod_uid", s(c.and_then(|c| c.pod_uid.as_deref()))),
        (
            "pod_namespace",
            s(c.and_then(|c| c.pod_namespace.as_deref())),
        ),
        ("pod_name", s(c.and_then(|c| c.pod_name.as_deref()))),
        ("image", s(c.and_then(|c| c.image.as_deref()))),
        ("image_id", s(c.and_then(|c| c.image_id.as_deref()))),
    ])
}

/// JSON to CEL: integers that fit i64 are ints, every other number a double
/// (`policies/README.md`), so `args.amount > 1000` means the same for `5000` and `5000.0`.
pub(crate) fn json_val(v: &serde_json::Value) -> Box<dyn Val + '_> {
    match v {
        serde_json::Value::Null => Box::new(CelNull),
        serde_json::Value::Bool(b) => Box::new(CelBool::from(*b)),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Box::new(CelInt::from(i)),
            None => Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN))),
        },
        serde_json::Value::String(s) => Box::new(CelString::from(s.as_str())),
        serde_json::Value::Array(a) => {
            Box::new(CelList::from(a.iter().map(json_val).collect::<Vec<_>>()))
        }
        serde_json::Value::Object(o) => {
            let m: HashMap<CelMapKey<'_>, Box<dyn Val + '_>> = o
                .iter()
                .map(|(k, v)| (CelMapKey::from(k.as_str()), json_val(v)))
                .collect();
            Box::new(CelMap::from(m))
        }
    }
}

/// An evaluation error in words that carry no value of the call. The error
/// reaches the decision's reason (the audit record, the event stream, the
/// agent's error) and the log, and a value may be a secret argument that the
/// audit configuration redacts: the interpreter's own messages print values
/// (`String("...") can not be compared to Int(1000)`), so only their types are kept.
fn describe(e: &cel::ExecutionError) -> String {
    use cel::ExecutionError as E;
    let t = |v: &Value| v.type_of().to_string();
    match e {
        // These carry type names, key names and counts from the expression only.
        E::InvalidArgumentCount { .. }
        | E::UnexpectedType { .. }
        | E::NoSuchKey(_)
        | E::NoSuchOverload(_)
        | E::UndeclaredReference(_)
        | E::MissingArgumentOrTarget => e.to_string(),
        E::UnsupportedTargetType { target } => format!("invalid argument type: {}", t(target)),
        E::NotSupportedAsMethod { method, target } => {
            format!("method '{method}' not supported on type {}", t(target))
        }
        E::UnsupportedKeyType(v) => format!("a {} cannot be a map key", t(v)),
        E::ValuesNotComparable(a, b) => format!("a {} cannot be compared to a {}", t(a), t(b)),
        E::UnsupportedBinaryOperator(op, a, b) => {
            format!("operator '{op}' does not apply to {} and {}", t(a), t(b))
        }
        E::UnsupportedIndex(i, v) => format!("a {} cannot index a {}", t(i), t(v)),
        E::FunctionError { function, .. } => format!("function '{function}' failed"),
        E::DivisionByZero(_) => "division by zero".into(),
        E::RemainderByZero(_) => "remainder by zero".into(),
        E::Overflow(op, a, b) => format!("overflow in '{op}' on {} and {}", t(a), t(b)),
        E::IndexOutOfBounds(_) => "index out of bounds".into(),
        E::DuplicateKey(v) => format!("repeated map key (a {})", t(v)),
        _ => "the expression could not be evaluated".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{AgentInfo, CallContext};
    use serde_json::json;

    fn call(args: serde_json::Value) -> CallContext {
        CallContext {
            agent: AgentInfo {
                name: "billing-bot".into(),
                owner: Some("alice".into()),
                orphaned: false,
            },
            process: kya_common::ProcessIdentity {
                pid: 42,
                uid: 1000,
                gid: 1000,
                exe: "/usr/bin/python3".into(),
                comm: "python3".into(),
                cgroup: "/agents/billing".into(),
                ..Default::default()
            },
            server: "mcp.example.com".into(),
            destination: Some("203.0.113.7:443".parse().unwrap()),
            method: "tools/call".into(),
            tool: Some("transfer".into()),
            args,
            // 2026-11-26 is a Thursday.
            time: time::macros::datetime!(2026-11-26 22:30 UTC),
            credential: None,
            tool_pin: Default::default(),
        }
    }

    fn eval(src: &str, args: serde_json::Value) -> Result<bool, String> {
        let c = Condition::compile(src)?;
        c.eval_bool(&Activation::new(&call(args), time::UtcOffset::UTC))
    }

    #[test]
    fn evaluation_errors_name_types_never_the_calls_values() {
        const SECRET: &str = "kya-cel-secret-4471";
        let cases = [
            ("args.amount > 1000", json!({"amount": SECRET})),
            ("args.amount + 1 == 2", json!({"amount": SECRET})),
            ("args.list[args.i] == 1", json!({"list": [1], "i": SECRET})),
            ("args.m[args.k] == 1", json!({"m": {"a": 1}, "k": [SECRET]})),
            ("int(args.amount) == 1", json!({"amount": SECRET})),
            ("duration(args.d) > duration('1s')", json!({"d": SECRET})),
            ("args.n / args.z == 1", json!({"n": 7, "z": 0})),
            ("args.list[5] == 1", json!({"list": [SECRET]})),
        ];
        for (src, args) in cases {
            let Err(e) = eval(src, args.clone()) else {
                panic!("{src} with {args} evaluated");
            };
            assert!(!e.contains(SECRET), "{src}: the error shows the value: {e}");
            assert!(!e.is_empty(), "{src}");
        }
        let Err(e) = eval("args.amount > 1000", json!({"amount": SECRET})) else {
            panic!("compared a string to an int");
        };
        assert!(e.contains("string") && e.contains("int"), "{e}");
    }

    #[test]
    fn numbers_compare_across_int_and_double() {
        assert_eq!(
            eval("args.amount > 1000", json!({"amount": 5000})),
            Ok(true)
        );
        assert_eq!(
            eval("args.amount > 1000", json!({"amount": 5000.5})),
            Ok(true)
        );
        assert_eq!(
            eval("args.amount > 1000.5", json!({"amount": 1001})),
            Ok(true)
        );
        assert_eq!(
            eval("args.amount > 1000", json!({"amount": 999})),
            Ok(false)
        );
        // u64 beyond i64 becomes a double, still comparable.
        assert_eq!(
            eval(
                "args.amount > 1000",
                json!({"amount": 18446744073709551615u64})
            ),
            Ok(true)
        );
    }

    #[test]
    fn process_container_and_netns_are_readable() {
        let none = eval(
            r#"process.container.id == "" && process.netns == 0"#,
            json!({}),
        );
        assert_eq!(none, Ok(true));
        let id = "3f4e8a1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789ab";
        let mut c = call(json!({}));
        c.process.cgroup = format!("/system.slice/docker-{id}.scope");
        c.process.container = kya_common::container_of_cgroup(&c.process.cgroup);
        c.process.netns = 4026532001;
        let check = |src: &str| {
            Condition::compile(src)
                .unwrap()
                .eval_bool(&Activation::new(&c, time::UtcOffset::UTC))
        };
        assert_eq!(
            check(&format!(
                r#"process.container.id == "{id}" && process.container.runtime == "docker""#
            )),
            Ok(true)
        );
        assert_eq!(check(r#"process.container.pod_uid == """#), Ok(true));
        assert_eq!(
            check(r#"process.container.pod_namespace == "" && process.container.pod_name == """#),
            Ok(true)
        );
        assert_eq!(check("process.netns == 4026532001"), Ok(true));
        assert_eq!(
            check(r#"process.container.id.startsWith("3f4e8a")"#),
            Ok(true)
        );
        // the image: empty until the engine answered
        assert_eq!(
            check(r#"process.container.image == "" && process.container.image_id == """#),
            Ok(true)
        );
        let image_id = "dec98d5f5d7686bb20a235ee4b98429239e2b492231e028f5fb453a7a2362229";
        if let Some(ct) = c.process.container.as_mut() {
            ct.image = Some("localhost/agent:1.2".into());
            ct.image_id = Some(image_id.into());
        }
        let check = |src: &str| {
            Condition::compile(src)
                .unwrap()
                .eval_bool(&Activation::new(&c, time::UtcOffset::UTC))
        };
        assert_eq!(
            check(
                r#"process.container.image == "localhost/agent:1.2" && process.container.image_id.startsWith("dec98d5f")"#
            ),
            Ok(true)
        );
        assert_eq!(
            check(r#"process.container.image.startsWith("localhost/agent:")"#),
            Ok(true)
        );
    }

    #[test]
    fn destination_is_readable() {
        assert_eq!(
            eval(
                "destination.ip == '203.0.113.7' && destination.port == 443",
                json!({})
            ),
            Ok(true)
        );
        assert!(Condition::compile("destination.host == 'x'").is_err());
        let mut c = call(json!({}));
        c.destination = None;
        let cond = Condition::compile("destination == null").unwrap();
        assert_eq!(
            cond.eval_bool(&Activation::new(&c, time::UtcOffset::UTC)),
            Ok(true)
        );
    }

    #[test]
    fn string_and_missing_key_are_errors() {
        assert!(eval("args.amount > 1000", json!({"amount": "5000"})).is_err());
        assert!(eval("args.amount > 1000", json!({})).is_err());
        assert!(eval("args.amount > 1000", json!(null)).is_err());
        assert!(
            eval("args.amount", json!({"amount": 1})).is_err(),
            "non-bool result"
        );
    }

    #[test]
    fn nested_args_and_macros() {
        let args = json!({"db": {"tables": ["users", "orders"], "opts": {"cascade": true}}});
        assert_eq!(eval("args.db.opts.cascade", args.clone()), Ok(true));
        assert_eq!(eval("'users' in args.db.tables", args.clone()), Ok(true));
        assert_eq!(
            eval(
                "args.db.tables.exists(t, t.startsWith('ord'))",
                args.clone()
            ),
            Ok(true)
        );
        assert_eq!(
            eval("args.db.tables.all(t, size(t) > 5)", args.clone()),
            Ok(false)
        );
        assert_eq!(eval("has(args.db.opts.cascade)", args.clone()), Ok(true));
        assert_eq!(eval("has(args.db.nope)", args.clone()), Ok(false));
        assert_eq!(
            eval(
                "args.db.tables.filter(t, t.endsWith('s')).size() == 2",
                args
            ),
            Ok(true)
        );
    }

    #[test]
    fn matches_caches_patterns_and_fails_closed_on_a_bad_runtime_pattern() {
        for _ in 0..3 {
            assert_eq!(
                eval("args.s.matches(args.p)", json!({"s": "abc", "p": "^a"})),
                Ok(true)
            );
            assert_eq!(
                eval("matches(args.s, args.p)", json!({"s": "abc", "p": "z$"})),
                Ok(false)
            );
        }
        // A pattern from the call itself that is not a regex is an error (the
        // engine counts it as matched for deny/hold rules), never `false`.
        assert!(eval(
            "args.s.matches(args.p)",
            json!({"s": "abc", "p": "(unclosed"})
        )
        .is_err());
        // Distinct patterns beyond the cache bound still evaluate correctly.
        for i in 0..(MAX_CACHED_REGEXES + 5) {
            let p = format!("^x{i}$");
            let s = format!("x{i}");
            assert_eq!(
                eval("args.s.matches(args.p)", json!({"s": s, "p": p})),
                Ok(true)
            );
        }
    }

    #[test]
    fn every_allowed_function_really_works() {
        let args = json!({"s": "abc", "n": 3, "l": [1, 2]});
        for src in [
            "size(args.s) == 3",
            "args.s.size() == 3",
            "args.s.contains('b')",
            "args.s.startsWith('a')",
            "args.s.endsWith('c')",
            "args.s.matches('^a.c$')",
            "int(args.n) == 3",
            "uint(args.n) == uint(3)",
            "double(args.n) == 3.0",
            "string(args.n) == '3'",
            "bool('true')",
            "type(args.n) == int",
            "dyn(args.n) == 3",
            "has(args.s)",
            "args.l.all(x, x > 0)",
            "args.l.exists(x, x == 2)",
            "args.l.exists_one(x, x == 2)",
            "args.l.map(x, x * 2) == [2, 4]",
            "args.l.filter(x, x > 1) == [2]",
        ] {
            assert_eq!(eval(src, args.clone()), Ok(true), "{src}");
        }
    }

    #[test]
    fn identity_time_and_nulls() {
        assert_eq!(
            eval(
                "agent.name == 'billing-bot' && agent.owner == 'alice' && !agent.orphaned",
                json!({})
            ),
            Ok(true)
        );
        assert_eq!(
            eval(
                "process.uid == 1000 && process.exe.endsWith('python3')",
                json!({})
            ),
            Ok(true)
        );
        assert_eq!(
            eval(
                "time.hour == 22 && time.minute == 30 && time.weekday == 4",
                json!({})
            ),
            Ok(true)
        );
        assert_eq!(eval("credential == null", json!({})), Ok(true));
        assert_eq!(
            eval(
                "tool == 'transfer' && server == 'mcp.example.com' && method == 'tools/call'",
                json!({})
            ),
            Ok(true)
        );
        let c = Condition::compile("time.hour").unwrap();
        let plus2 = time::UtcOffset::from_hms(2, 0, 0).unwrap();
        assert!(matches!(
            c.eval(&Activation::new(&call(json!({})), plus2)),
            Ok(Value::Int(0))
        ));
    }

    /// Hostile shapes, compiled (and evaluated when valid) on a 2 MiB stack,
    /// the size of a tokio worker's: an error, never a stack overflow.
    #[test]
    fn hostile_expressions_do_not_overflow_the_stack() {
        let cases: Vec<String> = vec![
            format!("{}true", "!".repeat(MAX_CEL_LEN - 4)),
            format!("{}1 > 0", "-".repeat(MAX_CEL_LEN - 5)),
            format!("{}1 > 0", "1 + ".repeat(1000)),
            format!("{}true", "true || ".repeat(500)),
            format!("{}true", "true && ".repeat(500)),
            format!("{}1 == 1", "true ? ".repeat(600) + &"1 : ".repeat(0)),
            format!("{}{}", "(".repeat(33), ")".repeat(33)),
            format!("{}1{} == 1", "(".repeat(32), ")".repeat(32)),
            format!("{}{} == []", "[".repeat(1000), "]".repeat(1000)),
            format!("args{} == 1", ".a".repeat(1500)),
            format!("args{} == 1", "['a']".repeat(800)),
            format!("{}true", "true ? true : ".repeat(300)),
            format!("{} == 1", "size(".repeat(30) + "args" + &")".repeat(30)),
            "'(((((((((((((((((((((((((((((((((((((((' == ''".to_string(),
        ];
        let compiled: Vec<Result<Condition, String>> =
            cases.iter().map(|s| Condition::compile(s)).collect();
        let outcomes: Vec<bool> = compiled.iter().map(|c| c.is_ok()).collect();
        let handle = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || {
                for c in compiled.into_iter().flatten() {
                    let c0 = call(json!({"a": {"a": 1}}));
                    let act = Activation::new(&c0, time::UtcOffset::UTC);
                    let _ = c.eval(&act);
                }
            })
            .unwrap();
        handle.join().expect("no stack overflow or panic");
        // 1000 chained additions are too deep; 33 nested brackets too; 32 are fine.
        assert!(!outcomes[2]);
        // The 32-deep parenthesised literal and quoted brackets are fine; 33 deep is not.
        assert!(!outcomes[6]);
        assert!(outcomes[7]);
        assert!(outcomes[13]);
    }

    #[test]
    fn variable_masks_name_what_is_read() {
        let c = Condition::compile("args.a > 1 && time.hour > 1").unwrap();
        assert_eq!(c.vars(), var_bit("args") | var_bit("time"));
        let c = Condition::compile("args.l.all(agent, agent > 0)").unwrap();
        assert_eq!(
            c.vars(),
            var_bit("args"),
            "a comprehension variable is not the agent"
        );
        assert_eq!(Condition::compile("1 == 1").unwrap().vars(), 0);
        // Evaluating with just the needed variables gives the same result.
        let call = call(json!({"a": 2}));
        let c = Condition::compile("args.a > 1 && tool == 'transfer'").unwrap();
        let act = Activation::with_vars(&call, time::UtcOffset::UTC, c.vars());
        assert_eq!(c.eval_bool(&act), Ok(true));
        // A missing variable would be an error, never a silent false.
        let act = Activation::with_vars(&call, time::UtcOffset::UTC, var_bit("args"));
        assert!(c.eval_bool(&act).is_err());
    }

    #[test]
    fn load_time_errors() {
        for (src, want) in [
            ("", "empty"),
            ("args.amount >", "does not parse"),
            ("arg.amount > 1", "unknown variable \"arg\""),
            ("sizee(args) > 1", "unknown function sizee"),
            ("args.x.frobnicate()", "unknown function frobnicate"),
            ("time.hours > 1", "unknown field time.hours"),
            ("args.s.matches('(unclosed')", "invalid regex"),
            ("matches(args.s, '[z-a]')", "invalid regex"),
            ("agent.email == 'x'", "unknown field agent.email"),
            ("google.protobuf.Int64Value{value: 1} == 1", "not supported"),
            ("args.l.all(x, y > 0)", "unknown variable \"y\""),
        ] {
            let err = Condition::compile(src).err().unwrap_or_default();
            assert!(err.contains(want), "{src:?}: {err}");
        }
        assert!(Condition::compile(&"1 + ".repeat(10_000)).is_err());
        // A comprehension variable does not leak out of its macro.
        assert!(Condition::compile("args.l.all(x, x > 0) && x > 0").is_err());
        // A comprehension variable may shadow a structured variable.
        assert!(Condition::compile("args.l.all(time, time.foo > 0)").is_ok());
    }
}
