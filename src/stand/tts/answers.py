"""Final answers of math solutions: extraction from a sample's text, normalisation, reference matching.

Extraction (first rule that finds something wins): the last `\\boxed{...}` (nested braces), the last
"the answer is ..." / "final answer: ...", the last number. Nothing found gives None, which callers
report as "no answer", never as a wrong one.

Normalisation turns an answer into a key: LaTeX is flattened (`\\frac{1}{2}`, `\\dfrac12` -> 1/2,
`\\sqrt{3}` -> sqrt(3), `\\text{No}` -> No), spaces and case dropped. A number or a numeric expression
(+ - * / ^, sqrt, pi) becomes its value: exact rationals as a reduced fraction (so 1/2, 0.5, 2/4 and
\\frac{1}{2} share the key "n:1/2"), irrational values rounded to 10 significant digits. Lists ("376
and 625", "1, 4, 9") become sorted sets. Symbolic expressions are compared as normalised text only.
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from fractions import Fraction
from typing import Callable

Extractor = Callable[[str], "str | None"]

NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?"
_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)


# ---- extraction ---------------------------------------------------------------------------------

def boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (braces balanced), or of `\\boxed 5`."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    for m in reversed(starts):
        i = m.end()
        if i < len(text) and text[i] == "{":
            inner = _balanced(text, i)
            if inner is not None:
                return inner.strip()
        elif i < len(text):
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                return tok.group(0)
    return None


def _balanced(text: str, i: int) -> str | None:
    """text[i] == '{': the content up to its matching '}', or None if unclosed."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1: j]
    return None


def answer_is(text: str) -> str | None:
    """What follows the last "the answer is" / "final answer:", up to the end of its line or sentence."""
    hits = list(_ANSWER_IS.finditer(text))
    if not hits:
        return None
    tail = hits[-1].group(1).strip()
    tail = re.split(r"\.(?:\s|$)|\n", tail)[0]  # a sentence ends at a period before a space (0.5 stays)
    tail = tail.strip().strip("*$ ").rstrip(".").strip()
    if tail.count("{") != tail.count("}"):  # cut off mid-expression, e.g. a truncated "\\boxed{"
        return None
    return tail or None


def last_number(text: str) -> str | None:
    nums = re.findall(NUMBER, text)
    return nums[-1].replace(" ", "") if nums else None


def extract_answer(text: str) -> str | None:
    """The final answer of a math solution, or None when none is found."""
    for rule in (boxed, answer_is, last_number):
        found = rule(text)
        if found:
            return found
    return None


# ---- normalisation ------------------------------------------------------------------------------

_LATEX_DROP = [r"\$", r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", r"\ ", "$", r"\(", r"\)",
               r"\[", r"\]", r"\%", "%"]
_LATEX_SUB = [(r"\cdot", "*"), (r"\times", "*"), (r"\div", "/"), (r"\pm", "±"), (r"\mp", "∓"), (r"\leq", "<="),
              (r"\le", "<="), (r"\geq", ">="), (r"\ge", ">="), ("≤", "<="), ("≥", ">="), (r"\neq", "!="),
              (r"\infty", "inf"), (r"\pi", "pi"), ("−", "-"), ("·", "*"), ("×", "*")]


def latex_to_plain(s: str) -> str:
    """Flattens the LaTeX a model puts in an answer into plain math text."""
    s = re.sub(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    for _ in range(4):  # nested fractions and roots, innermost first
        s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", lambda m: _frac(m[1], m[2]), s)
        s = re.sub(r"\\frac\s*(\w)\s*(\w)", r"\1/\2", s)  # \frac12
        s = re.sub(r"\\sqrt\s*\{([^{}]*)\}", r"sqrt(\1)", s)
        s = re.sub(r"\\sqrt\s*(\w)", r"sqrt(\1)", s)
    for a, b in _LATEX_SUB:
        s = s.replace(a, b)
    for a in _LATEX_DROP:
        s = s.replace(a, "")
    s = s.replace("{", "(").replace("}", ")")
    return s.strip().rstrip(".").strip()


def _frac(num: str, den: str) -> str:
    """a/b with the brackets precedence needs: numerators with + or -, denominators that are not atoms."""
    num, den = num.strip(), den.strip()
    num = f"({num})" if _top_level(num.lstrip("-"), "+-") else num
    den = den if re.fullmatch(r"\d+(\.\d+)?|[a-zA-Z]", den) else f"({den})"
    return f"{num}/{den}"


def _top_level(s: str, chars: str) -> bool:
    """Whether s has one of chars outside brackets."""
    depth = 0
    for c in s:
        depth += 1 if c in "([{" else -1 if c in ")]}" else 0
        if depth == 0 and c in chars:
            return True
    return False


def split_top(s: str) -> list[str]:
    """Splits a list answer at top-level commas, semicolons and the word "and" (not inside brackets)."""
    parts, depth, cur, i = [], 0, "", 0
    while i < len(s):
        c = s[i]
        depth += 1 if c in "([" else -1 if c in ")]" else 0
        if depth == 0 and (c in ",;" or s.startswith(" and ", i)):
            parts.append(cur)
            cur, i = "", i + (5 if c == " " else 1)
            continue
        cur += c
        i += 1
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def answer_key(answer: str) -> str:
    """The key two answers share when they are the same answer (see the module docstring)."""
    s = latex_to_plain(answer)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 2,001,000 (but "625, 376" is a list)
        s = s.replace(",", "")
    parts = split_top(s)
    if len(parts) > 1:
        return "{" + ",".join(sorted({_atom_key(p) for p in parts})) + "}"
    single = re.fullmatch(r"\s*[a-zA-Z]\s*=\s*([^=]+)", s)  # "x = 5" -> "5"
    return _atom_key(single[1] if single else s)


def _atom_key(s: str) -> str:
    s = re.sub(r"\s+", "", s).lower().rstrip(".")
    value = numeric_value(s)
    if value is not None:
        return "n:" + (str(value) if isinstance(value, Fraction) else f"{value:.10g}")
    return re.sub(r"(?<![a-z])\((\d+|[a-z])\)", r"\1", s)  # "2^(n)" -> "2^n"; f(x), (2n)! untouched


def numeric_value(s: str) -> Fraction | float | None:
    """The value of a number or numeric expression (+ - * / ^, sqrt, pi), exact where rational."""
    if not re.fullmatch(r"[\d.+\-*/^()]*", re.sub(r"sqrt|pi", "", s)) or not re.search(r"\d", s):
        return None
    expr = s.replace("^", "**")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # "2(3)" compiles with a warning
            tree = ast.parse(expr, mode="eval")
        return _eval(tree.body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None


def _eval(node: ast.AST) -> Fraction | float:
    """A tiny evaluator over a whitelist of nodes: no names but sqrt and pi, bounded exponents."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        return _binop(node.op, _eval(node.left), _eval(node.right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt" and len(node.args) == 1:
        return _sqrt(_eval(node.args[0]))
    if isinstance(node, ast.Name) and node.id == "pi":
        return math.pi
    raise ValueError("not a numeric expression")


def _binop(op: ast.operator, a, b):
    if isinstance(op, ast.Add):
        return a + b
    if isinstance(op, ast.Sub):
        return a - b
    if isinstance(op, ast.Mult):
        return a * b
    if isinstance(op, ast.Div):
        return a / b
    if isinstance(op, ast.Pow):
        if abs(b) > 4096:
            raise ValueError("exponent too large")
        if isinstance(b, Fraction) and b.denominator == 1 and isinstance(a, Fraction):
            return a ** int(b)
        return float(a) ** float(b)
    raise ValueError("operator not allowed")


def _sqrt(v):
    if v < 0:
        raise ValueError("sqrt of a negative number")
    if isinstance(v, Fraction):
        n, d = math.isqrt(v.numerator), math.isqrt(v.denominator)
        if n * n == v.numerator and d * d == v.denominator:
            return Fraction(n, d)
    return math.sqrt(v)


# ---- reference answers (CHAMP style) -------------------------------------------------------------

_ONLY_VALUE = [r"^(.+?) is the only possible value$", r"^the limit exists and is equal to (.+)$",
               r"^the only possible value for the limit is (.+)$", r"^the only possible value is (.+)$"]


def reference_forms(reference: str) -> list[str]:
    """The accepted forms of a reference answer written in words, as CHAMP writes them.

    "C(10, 5), or equivalently 252" -> both forms; ", or approximately ..." is dropped (not exact);
    "100 (i.e., all values)" -> also "100"; "0 is the only possible value" / "The limit exists and is
    equal to 3" -> also the value; "98 values", "0 roots" -> also the number; "No integer solutions",
    "Yes, and ..." -> also "no" / "yes".
    """
    text = re.split(r",\s*or approximately", reference)[0]
    forms = [f.strip() for f in re.split(r",\s*or (?:equivalently|an equivalent form such as)\s*", text)]
    out = []
    for f in forms:
        out.append(f)
        bare = re.sub(r"\s*\((?:i\.e\.,?|no|none)[^()]*\)\s*$", "", f).strip()
        out.append(bare)
        for pat in _ONLY_VALUE:
            m = re.match(pat, bare, re.IGNORECASE)
            if m:
                out.append(m[1])
        m = re.fullmatch(r"(-?\d+)\s+[a-zA-Z ]+", bare)
        if m:
            out.append(m[1])
        first = re.match(r"(yes|no)\b", bare, re.IGNORECASE)
        if first:
            out.append(first[1])
    return list(dict.fromkeys(out))


def is_correct(answer: str | None, reference: str | None) -> bool | None:
    """True/False; None when there is no answer to judge or no reference to judge it by."""
    if answer is None or reference is None:
        return None
    return answer_key(answer) in {answer_key(f) for f in reference_forms(reference)}

