"""The ``imgindex`` group: how every command reports errors, logs and is
interrupted. Each command (group) has a module of its own beside this one."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys

import click

from imgindex.feedback import shown


class _ImgindexCommand(click.Command):
    """A command that checks the ``imgindex.*`` settings before it runs (once
    its arguments are parsed: ``--help`` works whatever they hold)."""

    def invoke(self, ctx):
        from imgindex.pipeline.config_check import check_config

        check_config()
        return super().invoke(ctx)


class _ImgindexGroup(click.Group):
    """Turn library errors into one ``Error: ...`` line instead of a traceback."""

    command_class = _ImgindexCommand

    def invoke(self, ctx):
        from imgindex.pipeline.errors import ImgindexError

        try:
            return super().invoke(ctx)
        except ImgindexError as e:
            raise click.ClickException(shown(str(e))) from None
        except KeyboardInterrupt as e:
            raise Interrupted(str(e) or "SIGINT") from None
        except BrokenPipeError:
            # `imgindex info X | head`: the reader left; say nothing, as cat does.
            # Python would complain again while flushing stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except OSError as e:
            # The last resort (disk full, a vanished folder): the file and the
            # system's words, not a traceback.
            from imgindex.pipeline.errors import error_text

            raise click.ClickException(shown(error_text(e))) from None


class Interrupted(click.ClickException):
    """Ctrl-C or SIGTERM: one line, and the exit status a shell expects."""

    def __init__(self, signame: str, what: str = ""):
        super().__init__(f"interrupted by {signame}{what}")
        self.exit_code = 143 if signame == "SIGTERM" else 130


def sigterm_as_interrupt(command):
    """SLURM's walltime and scancel send SIGTERM: treat it like Ctrl-C, and
    make sure either one stops the command (see `_interrupts_delivered`)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return command(*args, **kwargs)
        with _interrupts_delivered():
            return command(*args, **kwargs)

    return wrapper


class _SignalInterrupt(KeyboardInterrupt):
    """The KeyboardInterrupt a signal raised, named after it."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _interrupts_delivered():
    """SIGTERM and SIGINT raise KeyboardInterrupt, raised again if Python
    swallowed it.

    A signal's exception is raised wherever the main thread is; inside a
    finalizer (distributed's ``Future.__del__`` runs all the time) Python only
    prints "Exception ignored in" and carries on, and a scancel'd build ran to
    its end and exited 0. Such an interrupt reaches ``sys.unraisablehook``:
    it is sent to the main thread again, from another thread so that it is
    raised after the finalizer, not inside the hook.
    """
    import _thread
    import signal
    import threading

    swallowed: list[int] = []
    resent: list[threading.Timer] = []

    def interrupt(signum, frame):
        swallowed.clear()
        raise _SignalInterrupt(signum)

    def unraisable(hook_args) -> None:
        if not isinstance(hook_args.exc_value, _SignalInterrupt):
            previous_hook(hook_args)
            return
        swallowed.append(hook_args.exc_value.signum)
        resent.append(threading.Timer(0.01, _thread.interrupt_main, (swallowed[-1],)))
        resent[-1].start()

    handled = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        handled.append(signal.SIGINT)
    previous = {sig: signal.signal(sig, interrupt) for sig in handled}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
        if swallowed:  # the command returned before it was sent again
            raise _SignalInterrupt(swallowed[-1])
    finally:
        for timer in resent:
            timer.cancel()
        sys.unraisablehook = previous_hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@click.group(
    name="imgindex",
    cls=_ImgindexGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="imgindex")
@click.option(
    "-v", "--verbose", count=True, help="Log progress (-v) or debug detail (-vv)."
)
def cli(verbose: int) -> None:
    """Build and search FAISS similarity indexes of image folders on a Dask cluster."""
    _configure_logging(verbose)


def _configure_logging(verbose: int) -> None:
    import dask.config

    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("imgindex")
    log.setLevel(level)
    log.handlers = [handler]  # replace, so repeated in-process runs don't stack
    log.propagate = False
    if verbose < 2:
        # Dask's start-up chatter would bury our output. distributed is not
        # imported yet, so this reaches its logging set-up; worker processes
        # read the environment variable.
        dask.config.set({"logging.distributed": "warning"})
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


class _OneLine(logging.Filter):
    """A log record's exception as one line, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            record.msg = f"{record.getMessage()} {text}".strip()
            record.args = ()
            record.exc_info = record.exc_text = None
        return True


def shorten_distributed_logs() -> None:
    """Keep distributed's own errors (a lost scheduler: ~35 lines) to one line each.

    Its handlers exist once distributed is imported; ``-vv`` keeps tracebacks.
    """
    if logging.getLogger("imgindex").getEffectiveLevel() <= logging.DEBUG:
        return
    import distributed  # noqa: F401  (sets up its logging handlers)

    for handler in logging.getLogger("distributed").handlers:
        if not any(isinstance(f, _OneLine) for f in handler.filters):
            handler.addFilter(_OneLine())


def main() -> None:
    """The ``imgindex`` command."""
    import gc

    try:
        cli(prog_name="imgindex")
    finally:
        # What is left is torn down as the interpreter exits; the collector
        # need not search it for cycles first (0.08 s of a 10-photo build's
        # 1.4 s here). Exit handlers, thread joins and every object's own
        # release still run.
        gc.freeze()
