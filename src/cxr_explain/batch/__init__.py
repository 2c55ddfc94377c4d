"""``cxr-explain explain`` over many files: inputs and their output names, the output folder's
record (resume by settings), and the loop that keeps going past bad files."""
from .inputs import InputFile, collect_inputs
from .record import check_record, read_record
from .run import BatchResult, ExplainOptions, Failure, explain_batch

__all__ = ["BatchResult", "ExplainOptions", "Failure", "InputFile", "check_record", "collect_inputs",
           "explain_batch", "read_record"]
