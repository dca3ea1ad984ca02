"""A checkpoint's own chat template, rendered as transformers renders it, and bounded: a template is code from the Hub.

transformers' apply_chat_template renders a template in jinja2's ImmutableSandboxedEnvironment, which keeps it away
from Python's internals (no attribute starting with _, no changing a list or a dict, no range over 100,000 items).
The sandbox does not bound what a template costs: nested loops run for ever, and `'x' * 10**10`, or a string doubled
with `~` in a loop, asks for gigabytes. Here rendering is bounded in three plain ways:

- time: a deadline of RENDER_SECONDS, raised by a SIGALRM timer where there is one (Unix, in the main thread; in
  another thread only between pieces of output). A signal handler runs between two bytecodes, so it stops any loop
  of the template, but not one huge operation of C: hence
- values: what makes a big value out of small ones is checked against MAX_VALUE_CHARS characters (bits for an int):
  `*`, `**` and `+` through the sandbox's intercepted binary operators, before they are computed; `~` through the
  code generator, which joins through `bounded_concat`; the arguments and results of every call and filter (an
  argument such as center(10**10) before the call, a result such as a repeated replace() right after it);
- memory: on Linux, the address space may grow by at most RENDER_MEMORY while rendering (RLIMIT_AS), so what the
  checks of values cannot foresee (a string squared by replace() in a loop) is a MemoryError, caught;
- output: the text is streamed (Template.generate) and refused past `max_chars`, which the caller sets from its
  context (CHARS_PER_TOKEN per token), so a prompt far beyond what the model reads is refused before it is tokenized.

Whatever else a template raises (ZeroDivisionError, RecursionError, MemoryError, an {% include %} with no loader to
read it from) is caught too: every failure is one ValueError that names the template's file.
"""

import functools
import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Iterator, Optional

try:
    import resource  # Unix
except ImportError:
    resource = None

RENDER_SECONDS = 10.0  # real templates render a conversation in milliseconds
# More characters than any tokenizer packs into one token (a run of spaces in code can be one token, but not a
# prompt's worth of them): a text over CHARS_PER_TOKEN * context cannot fit in the context.
CHARS_PER_TOKEN = 16
MAX_RENDERED_CHARS = CHARS_PER_TOKEN * 2**18  # for a caller that does not know its context: 262,144 tokens
MAX_VALUE_CHARS = MAX_RENDERED_CHARS  # no value inside a template needs to be longer than its whole output
RENDER_MEMORY = 2**30  # bytes the address space may grow by while a template renders (Linux)


class TooLongForContext(ValueError):
    """A rendered prompt past the characters its context can hold."""


class ValueTooLarge(Exception):
    """A value a template was about to make, over MAX_VALUE_CHARS."""


class RenderDeadline(BaseException):
    """The deadline passed. A BaseException, as KeyboardInterrupt: no `except Exception` on the way swallows it."""


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool,
                         special_tokens: Optional[dict] = None, source: Any = "the chat template",
                         max_chars: int = MAX_RENDERED_CHARS) -> str:
    """A chat template's text for `messages`, exactly as transformers' apply_chat_template renders it: the sandbox,
    blocks trimmed as transformers trims them, the globals templates use (raise_exception, strftime_now, tojson) and
    the special tokens' text (bos_token, ...). Bounded as the module says; any failure, a template that refuses the
    conversation (raise_exception: "Conversation roles must alternate", say) included, is a ValueError naming
    `source`, the template's file; a text over max_chars is TooLongForContext."""
    import jinja2  # here: only this style needs it

    where = f"raised by {source}"
    compiled = compiled_template(template, str(source))
    pieces, size, end = [], 0, time.monotonic() + RENDER_SECONDS
    try:
        with render_limits(RENDER_SECONDS):
            for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                           tools=None, documents=None, **(special_tokens or {})):
                size += len(piece)
                if size > max_chars:
                    raise TooLongForContext(
                        f"the chat template wrote over {max_chars:,} characters for the conversation, more than the "
                        f"context can hold at {CHARS_PER_TOKEN} characters a token: the conversation is too long, or "
                        f"the template writes too much ({where})")
                if time.monotonic() > end:  # where no timer can interrupt (not in the main thread)
                    raise RenderDeadline
                pieces.append(piece)
    except TooLongForContext:
        raise
    except RenderDeadline:
        raise ValueError(f"the chat template ran for over {RENDER_SECONDS:g} s on one conversation and was stopped: "
                         f"it loops too long ({where})") from None
    except ValueTooLarge as error:
        raise ValueError(f"the chat template makes a value too large: {error} ({where})") from None
    except jinja2.TemplateError as error:
        raise ValueError(f"the chat template refused the conversation: {error} ({where})") from None
    except Exception as error:  # MemoryError and RecursionError too: the template's own failure, whatever it is
        raise ValueError(f"the chat template failed on the conversation ({type(error).__name__}: "
                         f"{str(error)[:200]}; {where})") from None
    text = "".join(pieces)
    if not text and messages:
        raise ValueError(f"the chat template wrote nothing for a conversation of {len(messages)} message(s): it "
                         f"renders no turn, so there is no prompt to read. Check the template ({where})")
    return text


@contextmanager
def render_limits(seconds: float) -> Iterator[None]:
    """Raise RenderDeadline after `seconds`, from a SIGALRM timer: only the main thread can take a signal. On Linux,
    the process's address space may also grow by at most RENDER_MEMORY meanwhile (RLIMIT_AS): what the checks of
    values cannot foresee (a string squared by replace() in a loop) is a MemoryError, not a machine out of memory."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise RenderDeadline

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    limits = address_space_limit(RENDER_MEMORY)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if limits is not None:
            resource.setrlimit(resource.RLIMIT_AS, limits)


def address_space_limit(headroom: int) -> Optional[tuple[int, int]]:
    """Limit the address space to its size now plus `headroom` bytes; the limits before, to restore (None where
    there is no /proc/self/statm or the hard limit is lower)."""
    try:
        size = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limits = resource.getrlimit(resource.RLIMIT_AS)
        if limits[1] != resource.RLIM_INFINITY and limits[1] < size + headroom:
            return None
        resource.setrlimit(resource.RLIMIT_AS, (size + headroom, limits[1]))
        return limits
    except (OSError, ValueError, AttributeError):
        return None


def check_size(size: int, what: str) -> None:
    if size > MAX_VALUE_CHARS:
        raise ValueTooLarge(f"{what} would be about {size:,} characters (or bits), over {MAX_VALUE_CHARS:,}")


def check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse `left operator right` before computing it where its result would be over MAX_VALUE_CHARS."""
    if isinstance(left, int) and isinstance(right, int):
        if operator == "**" and abs(left) > 1 and right > 0:
            check_size(right * left.bit_length(), f"{left} ** {right}")
        elif operator == "*":
            check_size(left.bit_length() + right.bit_length(), f"{left} * {right}")
    elif operator == "*" and isinstance(right, int) and hasattr(left, "__len__"):
        check_size(len(left) * right, f"a value of {len(left):,} items * {right:,}")
    elif operator == "*" and isinstance(left, int) and hasattr(right, "__len__"):
        check_size(len(right) * left, f"{left:,} * a value of {len(right):,} items")
    elif operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__"):
        check_size(len(left) + len(right), f"a sum of {len(left):,} and {len(right):,} items")


def checked_call(function, args: tuple, kwargs: dict) -> Any:
    """`function(*args, **kwargs)`, refused for an int argument over MAX_VALUE_CHARS (a width, a count) and for a
    result over it."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool):
            check_size(abs(value), f"an argument of {value:,}")
    result = function(*args, **kwargs)
    if isinstance(result, (str, list, tuple, dict)):
        check_size(len(result), f"the result of {getattr(function, '__name__', 'a call')}")
    return result


@functools.lru_cache(maxsize=8)
def compiled_template(template: str, source: str):
    import jinja2
    from jinja2.compiler import CodeGenerator
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """{% generation %}...{% endgeneration %}, which some templates put around the assistant's answer (for
        transformers' return_assistant_tokens_mask): renders its content unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node, frame):  # `a ~ b ~ c`: environment.bounded_concat((a, b, c)), not str_join
            self.write("environment.bounded_concat((")
            for argument in node.nodes:
                self.visit(argument, frame)
                self.write(", ")
            self.write("))")

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context, operator, left, right):
            check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, /, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
            parent = super().call
            return checked_call(lambda *a, **k: parent(__context, __obj, *a, **k), args, kwargs)

        def bounded_concat(self, values):
            texts = [str(value) for value in values]
            check_size(sum(map(len, texts)), "a ~ b")
            return "".join(texts)

    def bounded_filter(function):
        @functools.wraps(function)  # keeps jinja2's pass_context marks
        def checked(*args, **kwargs):
            return checked_call(function, args, kwargs)
        return checked

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # transformers' filter
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
    environment.filters["tojson"] = tojson
    environment.filters.update({name: bounded_filter(f) for name, f in environment.filters.items()})
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(template)
    except Exception as error:  # a syntax error, an unknown filter, a template nested too deeply to compile
        raise ValueError(f"the chat template cannot be read as Jinja ({type(error).__name__}: {str(error)[:200]}; "
                         f"raised by {source})") from None
