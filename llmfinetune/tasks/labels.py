"""Label vocabularies for classification tasks: ints, strings, bools or datasets ClassLabel features."""
from __future__ import annotations

from typing import Any, Callable, Iterable

from ..errors import UserError


def label_names(values: Iterable[Any], feature: Any, column: str) -> list[str]:
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    distinct = {v for v in values if v is not None}
    if not distinct:
        raise UserError(f"ft_config.data_config.label_column: column '{column}' has no labels in the train split.")
    kinds = {type(v) for v in distinct}
    if kinds <= {int, bool}:
        return [str(int(v)) for v in sorted(distinct)]
    if kinds == {str}:
        ordered = sorted(distinct)
        if "O" in distinct:  # BIO tag sets read best with the outside tag first
            ordered = ["O"] + [t for t in ordered if t != "O"]
        return ordered
    if kinds <= {float, int} and all(float(v).is_integer() for v in distinct):
        return [str(int(v)) for v in sorted(distinct)]
    raise UserError(
        f"ft_config.data_config.label_column: column '{column}' holds {', '.join(sorted(k.__name__ for k in kinds))} "
        "values; expected class labels as ints or strings."
    )


def check_scalar_labels(values: Iterable[Any], column: str, split: str) -> None:
    """One class label per row: a list or mapping there (often a mis-named column) is named with its row."""
    for row, value in enumerate(values):
        if isinstance(value, (list, dict)):
            raise UserError(f"split '{split}', row {row}: label {value!r} in column '{column}' is a "
                            f"{type(value).__name__}; expected one class label (an int or a string). Check "
                            "ft_config.data_config.label_column.")


def label_lookup(names: list[str], feature: Any) -> dict[Any, int]:
    """Map every spelling a label may take in the data (int id, int value, string) to its class id."""
    lookup: dict[Any, int] = {}
    has_classlabel = bool(getattr(feature, "names", None))
    for index, name in enumerate(names):
        lookup[name] = index
        if has_classlabel:
            lookup[index] = index
        else:
            try:
                lookup[int(name)] = index
            except ValueError:
                pass
    return lookup


def encode_label(value: Any, lookup: dict[Any, int], column: str, split: str, row: int) -> int:
    key = int(value) if isinstance(value, float) and value.is_integer() else value
    if isinstance(key, bool):
        key = int(key)
    if key not in lookup:
        known = ", ".join(str(k) for k in list(lookup)[:20])
        raise UserError(f"split '{split}', row {row}: label {value!r} in column '{column}' is not among the labels "
                        f"of the train split ({known}).")
    return lookup[key]


def prepare_classification(used: dict, encode: Callable[[str], Callable], names: list[str], eval_split: str):
    """Tokenize each split with its row indices (so label errors name the row) and attach the label maps."""
    from .base import Prepared, tokenize_split

    tokenized = {name: tokenize_split(split, encode(name), name, with_indices=True) for name, split in used.items()}
    id2label = dict(enumerate(names))
    return Prepared(tokenized["train"], tokenized[eval_split],
                    {"num_labels": len(names), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}})
