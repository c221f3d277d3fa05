"""seq2seq: an English<->Japanese Transformer translation toolkit built around attention."""


class Seq2SeqError(Exception):
    """A problem with the user's input (corpus, config, checkpoint, text), shown as one line.

    The message names the file and, where there is one, the line: ``train.en:17: invalid UTF-8``.
    ``run.py`` prints it without a traceback and exits with status 1.
    """
