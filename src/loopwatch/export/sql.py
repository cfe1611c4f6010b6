r"""PostgreSQL query text with its literal values taken out, for ``db.query.text``.

The database semantic conventions capture query text by default only with every literal
replaced by ``?``: a query built with string formatting (``WHERE id = 42``) or one that
cannot take parameters (``ALTER ROLE app PASSWORD '…'``) would otherwise put its values
into every span. This is a lexer, not a parser, on PostgreSQL's own lexical rules
(``scan.l``): string constants in every form (``'…'``, ``E'…'``, ``U&'…'``, ``B'…'``,
``X'…'``, ``N'…'``, dollar-quoted) and numeric constants (with PostgreSQL 16's
hexadecimal, octal, binary and underscored forms) become ``?``; comments (nested ``/* */``
too) are dropped; identifiers, quoted identifiers, keywords (``TRUE``, ``NULL``),
operators and ``$n`` parameters stay; an ``IN (?, ?, ?)`` list becomes ``IN (?)``.

Where it cannot be sure where a literal ends, the rest of the text is one ``?``: after an
unterminated quote, quoted identifier, dollar quote or comment, and after a string whose
end depends on ``standard_conforming_strings`` (``'C:\'``), a server setting the client
does not know.

``db.operation.name`` is read from the sanitized text (:func:`operation_name`): its first
keyword; for a statement that starts with ``WITH``, that of the statement its common table
expressions lead to.

A lexer of its own rather than a library's: sqlparse reads backslashes as MySQL does
(``'C:\', 'secret'`` leaves ``secret`` out of the string), ends a nested comment early and
goes on past an unterminated quote; pglast (PostgreSQL's own scanner) is right but a 33 MB
extension, and slower on the statements that matter most, short parameterized ones.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

# What db.query.text holds: the sanitized text (the default), the text as the app sent it
# (unsafe: literal values reach the spans), or nothing.
QueryText = Literal["sanitized", "raw", "off"]
QUERY_TEXT_MODES: tuple[QueryText, ...] = ("sanitized", "raw", "off")

PLACEHOLDER = "?"
CACHE_SIZE = 1024  # statements
MAX_CHARS = 4096  # a longer text is cut there
TRUNCATED = " …"

# Inside our output a placeholder is NUL until the IN lists are collapsed: PostgreSQL
# refuses NUL in query text, so it cannot be confused with a `?` of the query (jsonb's
# `?` operator).
_MARK = "\x00"

# PostgreSQL's identifier characters: ASCII letters and _, every non-ASCII character, then
# digits and $ too. Written as the ASCII characters they exclude: a class that spans the
# Unicode range takes milliseconds to compile.
_IDENT_START = r"[^\x00-@\[-^`{-\x7f]"
_IDENT_CONT = r"[^\x00-#%-/:-@\[-^`{-\x7f]"
_TAG_CONT = r"[^\x00-/:-@\[-^`{-\x7f]"  # a dollar quote's tag: no $
_OTHER = r"[\x00-!#%&(-,:-@\[-^`{-\x7f]"  # what starts neither a word, a literal nor a comment
_DEC = r"[0-9](?:_?[0-9])*"
_SPACE = " \t\n\r\f\v"  # PostgreSQL's whitespace: other spaces are identifier characters

_TOKEN = re.compile(
    rf"""
    (?P<keep>  # a run of what stays as it is
        (?:
            (?![EeBbXxNn]'|[Uu]&'){_IDENT_START}{_IDENT_CONT}*  # not a string's prefix
          | \$[0-9]+                            # a parameter
          | "(?:[^"]|"")*"                     # a quoted identifier
          | {_OTHER}+                          # whitespace, operators, punctuation
          | -(?!-) | /(?!\*) | \.\. | \.(?![0-9.])
        )+
    )
  | (?P<plain>(?:[Nn]|[Uu]&)?'(?:[^']|'')*')  # a backslash is a character here
  | (?P<escape>[Ee]'(?:[^'\\]|''|\\.)*')  # E'…': backslash escapes
  | (?P<bits>[BbXx]'[^']*')
  | (?P<number>
        0[Xx](?:_?[0-9A-Fa-f])+ | 0[Oo](?:_?[0-7])+ | 0[Bb](?:_?[01])+
      | (?:{_DEC}(?:\.(?!\.)(?:{_DEC})?)? | \.{_DEC})(?:[Ee][-+]?{_DEC})?
    )
  | (?P<dollar>\$(?:{_IDENT_START}{_TAG_CONT}*)?\$)
  | (?P<comment>--[^\n\r]*|/\*)
  | (?P<open>(?:[EeBbXxNn]|[Uu]&)?'|")  # a quote or quoted identifier never closed
  | (?P<other>.)  # a lone $ or .
    """,
    re.VERBOSE | re.DOTALL,
)
_ESCAPE_STRING = re.compile(r"'(?:[^'\\]|''|\\.)*'", re.DOTALL)
_BLOCK_EDGE = re.compile(r"/\*|\*/")
_IN_LIST = re.compile(  # [Ii][Nn], not (?i): that would case-fold the class above
    rf"((?<!{_IDENT_CONT})[Ii][Nn][{_SPACE}]*\([{_SPACE}]*){_MARK}"
    rf"(?:[{_SPACE}]*,[{_SPACE}]*{_MARK})+([{_SPACE}]*\))"
)


def sanitize(text: str) -> str:
    """``text`` with its literals replaced by ``?`` and its comments dropped; past
    :data:`MAX_CHARS`, its start followed by `` …``.

    Cached by the text: a statement seen before costs a dictionary lookup.
    """
    if len(text) <= MAX_CHARS:
        return _sanitize(text)
    # Cut before lexing, so that neither the time on the event loop nor the cache's memory
    # grows with the text. Wherever the cut falls it is safe: a literal it opens is
    # unterminated there, so it becomes `?`.
    return _sanitize(text[:MAX_CHARS]) + TRUNCATED


@lru_cache(maxsize=CACHE_SIZE)
def _sanitize(text: str) -> str:
    out: list[str] = []
    pos, end = 0, len(text)
    match = _TOKEN.match
    while pos < end:
        m = match(text, pos)
        if m is None:  # cannot happen: `other` matches any character
            break
        kind, lexeme, pos = m.lastgroup, m.group(), m.end()
        if kind == "keep" or kind == "other":
            out.append(lexeme)
        elif kind == "plain":
            out.append(_MARK)
            # With standard_conforming_strings off (a server setting), a backslash
            # escapes a quote: when that reading ends the string elsewhere, where it
            # ends is unknown, and so is all that follows.
            if "\\" in lexeme and _ends_elsewhere(text, m.start() + lexeme.index("'"), pos):
                break
        elif kind == "dollar":
            out.append(_MARK)
            close = text.find(lexeme, pos)
            if close < 0:
                break
            pos = close + len(lexeme)
        elif kind == "comment":
            if lexeme == "/*":
                pos = _block_end(text, pos)
                if pos < 0:
                    out.append(_MARK)
                    break
            pos = _drop_comment(out, text, pos)
        elif kind == "open":
            out.append(_MARK)
            break
        else:  # a string, bit string or number
            out.append(_MARK)
    result = "".join(out)
    if result.count(_MARK) > 1 and _MARK not in text:
        result = _IN_LIST.sub(rf"\1{_MARK}\2", result)
    return result.replace(_MARK, PLACEHOLDER)


def _ends_elsewhere(text: str, quote: int, end: int) -> bool:
    m = _ESCAPE_STRING.match(text, quote)
    return m is None or m.end() != end


def _block_end(text: str, pos: int) -> int:
    """The end of the block comment whose ``/*`` ends at ``pos`` (they nest), or -1."""
    depth = 1
    for m in _BLOCK_EDGE.finditer(text, pos):
        depth += 1 if m.group() == "/*" else -1
        if depth == 0:
            return m.end()
    return -1


def _drop_comment(out: list[str], text: str, pos: int) -> int:
    """Drop a comment with the whitespace before it; one space keeps the tokens on either
    side apart. At the start of the text, the whitespace after it goes too."""
    if out:
        out[-1] = out[-1].rstrip(_SPACE)
        if not out[-1]:
            out.pop()
    if not out:
        while pos < len(text) and text[pos] in _SPACE:
            pos += 1
    elif pos < len(text) and text[pos] not in _SPACE:
        out.append(" ")
    return pos


def first_keyword(text: str | None) -> str | None:
    """The first keyword of a sanitized query text, past any opening parenthesis."""
    if not text:
        return None
    word = text.lstrip(" \t\r\n(").split(None, 1)
    return word[0].upper() if word and word[0].isalpha() else None


def operation_name(text: str | None) -> str | None:
    """``db.operation.name`` of a sanitized query text: its first keyword; for a statement
    that starts with ``WITH``, the first keyword of the statement its common table
    expressions lead to (``WITH d AS (DELETE …) INSERT …`` is an ``INSERT``), or None
    where that cannot be told. Never ``WITH``."""
    keyword = first_keyword(text)
    if keyword != "WITH" or text is None:
        return keyword
    return _after_with(text)


# The tokens of a sanitized text, which has no literal and no comment left: a quoted
# identifier (it may hold parentheses), a parenthesis or comma, or a run of anything else.
_CTE_TOKEN = re.compile(r'"(?:[^"]|"")*"|[(),]|[^\s(),"]+')
# What a WITH can lead to (PostgreSQL's grammar: a SELECT in any of its forms, or a
# data-modifying statement).
_WITH_LEADS_TO = frozenset(("SELECT", "VALUES", "TABLE", "INSERT", "UPDATE", "DELETE", "MERGE"))
# SEARCH … SET column and CYCLE … USING column may follow a CTE's body.
_CTE_CLAUSE_END = {"SEARCH": "SET", "CYCLE": "USING"}


@lru_cache(maxsize=CACHE_SIZE)
def _after_with(text: str) -> str | None:
    try:
        return _statement(_CTE_TOKEN.findall(text), 0)
    except IndexError:  # the text ends before its statement does
        return None


def _statement(tokens: list[str], i: int) -> str | None:
    """The operation of the statement at ``tokens[i]``, past its opening parentheses and
    any WITH clause."""
    while tokens[i] == "(":
        i += 1
    word = tokens[i].upper()
    if word != "WITH":
        return word if word in _WITH_LEADS_TO else None
    i += 1
    if tokens[i].upper() == "RECURSIVE":
        i += 1
    while True:  # name [(columns)] AS [[NOT] MATERIALIZED] (body) [SEARCH …] [CYCLE …]
        if tokens[i] in ("(", ")", ","):
            return None
        i += 1
        if tokens[i] == "(":
            i = _past_parentheses(tokens, i)
        if tokens[i].upper() != "AS":
            return None
        i += 1
        if tokens[i].upper() == "NOT":
            i += 1
        if tokens[i].upper() == "MATERIALIZED":
            i += 1
        if tokens[i] != "(":
            return None
        i = _past_parentheses(tokens, i)
        while (end := _CTE_CLAUSE_END.get(tokens[i].upper())) is not None:
            while tokens[i].upper() != end:
                i += 1
            i += 2  # the keyword and its column
        if tokens[i] != ",":
            return _statement(tokens, i)
        i += 1


def _past_parentheses(tokens: list[str], i: int) -> int:
    """The index just past the parenthesis that closes the one at ``tokens[i]``."""
    depth = 0
    while True:
        lexeme = tokens[i]
        i += 1
        if lexeme == "(":
            depth += 1
        elif lexeme == ")":
            depth -= 1
            if depth == 0:
                return i


__all__ = [
    "CACHE_SIZE",
    "MAX_CHARS",
    "PLACEHOLDER",
    "QUERY_TEXT_MODES",
    "TRUNCATED",
    "QueryText",
    "first_keyword",
    "operation_name",
    "sanitize",
]
