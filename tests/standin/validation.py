"""``POST /prompt`` validation, ported from ComfyUI 0.3.64's ``execution.validate_prompt``/``validate_inputs``.

The bodies clients see come from here, so this follows ComfyUI's control flow closely, quirks included:
only output nodes and their ancestors are validated; values are coerced in place (``"8"`` -> 8 for INT);
min/max/combo checks are skipped for inputs a ``VALIDATE_INPUTS`` names; V3 ``COMBO`` inputs are not
checked; combos over 20 options report ``(list of length N)`` with ``input_config`` null; a link to a
missing node is an ``exception_during_validation`` KeyError; and every failing output is appended to the
``dependent_outputs`` of every node that has errors so far (ComfyUI shares one ``validated`` map).
One deliberate difference: ComfyUI iterates inputs and outputs through Python sets (hash order, which
varies per process); the stand-in uses declaration/prompt order, so error lists are in a stable order.
"""

from __future__ import annotations

import inspect
import logging
import sys
import traceback
from typing import Any

import nodes


def full_type_name(klass: type) -> str:
    """``module.QualName`` except for builtins, as ComfyUI reports exception types."""
    module = klass.__module__
    if module == "builtins":
        return klass.__qualname__
    return module + "." + klass.__qualname__


def get_input_info(class_def: type, input_name: str, valid_inputs: dict | None = None):
    """(type, category, extra options) of one declared input, or (None, None, None)."""
    valid_inputs = valid_inputs or class_def.INPUT_TYPES()
    for category in ("required", "optional", "hidden"):
        if category in valid_inputs and input_name in valid_inputs[category]:
            input_info = valid_inputs[category][input_name]
            break
    else:
        return None, None, None
    if isinstance(input_info, str):
        return input_info, category, {}
    input_type = input_info[0]
    extra_info = input_info[1] if len(input_info) > 1 else {}
    return input_type, category, extra_info


def validate_node_input(received_type: Any, input_type: Any, strict: bool = False) -> bool:
    """ComfyUI's type compatibility: equal, ``*`` wildcards, or comma-separated unions overlapping."""
    if received_type == input_type:
        return True
    if not isinstance(received_type, str) or not isinstance(input_type, str):
        return False
    if received_type == "*" or input_type == "*":
        return True
    received = set(t.strip() for t in received_type.split(","))
    accepted = set(t.strip() for t in input_type.split(","))
    if strict:
        return received.issubset(accepted)
    return len(received & accepted) > 0


def _validate_function(obj_class: type):
    """VALIDATE_INPUTS and its argument names (``input_types`` and **kwargs matter)."""
    fn = getattr(obj_class, "VALIDATE_INPUTS", None)
    if fn is None:
        return None, [], False
    spec = inspect.getfullargspec(fn)
    return fn, spec.args, spec.varkw is not None


def _error(type_: str, message: str, details: str, extra_info: dict) -> dict:
    return {"type": type_, "message": message, "details": details, "extra_info": extra_info}


def validate_inputs(prompt: dict, item: str, validated: dict) -> tuple:
    """Validate one node (recursing into linked inputs first); memoised in ``validated``."""
    unique_id = item
    if unique_id in validated:
        return validated[unique_id]
    inputs = prompt[unique_id]["inputs"]
    class_type = prompt[unique_id]["class_type"]
    obj_class = nodes.NODE_CLASS_MAPPINGS[class_type]
    class_inputs = obj_class.INPUT_TYPES()
    valid_inputs = list(class_inputs.get("required", {})) + [
        k for k in class_inputs.get("optional", {}) if k not in class_inputs.get("required", {})]

    errors: list[dict] = []
    valid = True
    validate_function, validate_function_inputs, validate_has_kwargs = _validate_function(obj_class)
    received_types: dict[str, Any] = {}

    for x in valid_inputs:
        input_type, input_category, extra_info = get_input_info(obj_class, x, class_inputs)
        if x not in inputs:
            if input_category == "required":
                errors.append(_error("required_input_missing", "Required input is missing", f"{x}",
                                     {"input_name": x}))
            continue

        val = inputs[x]
        info = (input_type, extra_info)
        if isinstance(val, list):
            if len(val) != 2:
                errors.append(_error("bad_linked_input",
                                     "Bad linked input, must be a length-2 list of [node_id, slot_index]", f"{x}",
                                     {"input_name": x, "input_config": info, "received_value": val}))
                continue
            o_id = val[0]
            o_class_type = prompt[o_id]["class_type"]
            r = nodes.NODE_CLASS_MAPPINGS[o_class_type].RETURN_TYPES
            received_type = r[val[1]]
            received_types[x] = received_type
            if "input_types" not in validate_function_inputs and not validate_node_input(received_type, input_type):
                details = f"{x}, received_type({received_type}) mismatch input_type({input_type})"
                errors.append(_error("return_type_mismatch", "Return type mismatch between linked nodes", details,
                                     {"input_name": x, "input_config": info, "received_type": received_type,
                                      "linked_node": val}))
                continue
            try:
                r = validate_inputs(prompt, o_id, validated)
                if r[0] is False:
                    valid = False
                    continue
            except Exception as ex:  # noqa: BLE001 - reported to the client, as ComfyUI does
                typ, _, tb = sys.exc_info()
                valid = False
                validated[o_id] = (False, [_error(
                    "exception_during_inner_validation", "Exception when validating inner node", str(ex),
                    {"input_name": x, "input_config": info, "exception_message": str(ex),
                     "exception_type": full_type_name(typ), "traceback": traceback.format_tb(tb),
                     "linked_node": val})], o_id)
                continue
        else:
            try:
                if isinstance(val, dict) and "__value__" in val:
                    val = val["__value__"]
                    inputs[x] = val
                if input_type == "INT":
                    val = int(val)
                    inputs[x] = val
                if input_type == "FLOAT":
                    val = float(val)
                    inputs[x] = val
                if input_type == "STRING":
                    val = str(val)
                    inputs[x] = val
                if input_type == "BOOLEAN":
                    val = bool(val)
                    inputs[x] = val
            except Exception as ex:  # noqa: BLE001
                errors.append(_error("invalid_input_type",
                                     f"Failed to convert an input value to a {input_type} value",
                                     f"{x}, {val}, {ex}",
                                     {"input_name": x, "input_config": info, "received_value": val,
                                      "exception_message": str(ex)}))
                continue

            if x not in validate_function_inputs and not validate_has_kwargs:
                error = _range_or_combo_error(x, val, input_type, extra_info, info)
                if error is not None:
                    errors.append(error)
                    continue

    if validate_function is not None and (len(validate_function_inputs) > 0 or validate_has_kwargs):
        errors.extend(_custom_validation(obj_class, validate_function, validate_function_inputs,
                                         validate_has_kwargs, inputs, received_types))

    ret = (False, errors, unique_id) if (len(errors) > 0 or valid is not True) else (True, [], unique_id)
    validated[unique_id] = ret
    return ret


def _range_or_combo_error(x: str, val: Any, input_type: Any, extra_info: dict, info: tuple) -> dict | None:
    """min, max, then V1 combo membership (a list TYPE); V3 "COMBO" inputs are not checked."""
    if "min" in extra_info and val < extra_info["min"]:
        return _error("value_smaller_than_min", "Value {} smaller than min of {}".format(val, extra_info["min"]),
                      f"{x}", {"input_name": x, "input_config": info, "received_value": val})
    if "max" in extra_info and val > extra_info["max"]:
        return _error("value_bigger_than_max", "Value {} bigger than max of {}".format(val, extra_info["max"]),
                      f"{x}", {"input_name": x, "input_config": info, "received_value": val})
    if isinstance(input_type, (list, tuple)) and val not in input_type:
        input_config: Any = info
        if len(input_type) > 20:
            list_info = f"(list of length {len(input_type)})"
            input_config = None
        else:
            list_info = str(list(input_type))
        return _error("value_not_in_list", "Value not in list", f"{x}: '{val}' not in {list_info}",
                      {"input_name": x, "input_config": input_config, "received_value": val})
    return None


def _custom_validation(obj_class, validate_function, fn_inputs: list[str], has_kwargs: bool, inputs: dict,
                       received_types: dict) -> list[dict]:
    """Call VALIDATE_INPUTS with the constant inputs it names; anything but True is a failure."""
    call_args = {}
    for name, value in inputs.items():
        if isinstance(value, list):
            continue
        if name in fn_inputs or has_kwargs:
            call_args[name] = value
    if "input_types" in fn_inputs:
        call_args["input_types"] = received_types
    result = validate_function(**call_args)
    errors = []
    if result is not True:
        for x in call_args:
            details = f"{x}" if result is False else f"{x} - {result}"
            errors.append(_error("custom_validation_failed", "Custom validation failed for node", details,
                                 {"input_name": x}))
    return errors


def validate_prompt(prompt: Any, partial_execution_list: list[str] | None) -> tuple:
    """(valid, error, good_outputs, node_errors) exactly as ComfyUI's POST /prompt consumes it."""
    outputs: list[str] = []
    for x in prompt:
        if "class_type" not in prompt[x]:
            return (False, _error("invalid_prompt",
                                  "Cannot execute because a node is missing the class_type property.",
                                  f"Node ID '#{x}'", {}), [], {})
        class_type = prompt[x]["class_type"]
        class_ = nodes.NODE_CLASS_MAPPINGS.get(class_type, None)
        if class_ is None:
            return (False, _error("invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                                  f"Node ID '#{x}'", {}), [], {})
        if nodes.is_output_node(class_) and (partial_execution_list is None or x in partial_execution_list):
            outputs.append(x)

    if len(outputs) == 0:
        return (False, _error("prompt_no_outputs", "Prompt has no outputs", "", {}), [], {})

    good_outputs: list[str] = []
    errors: list[tuple[str, list[dict]]] = []
    node_errors: dict[str, dict] = {}
    validated: dict[str, tuple] = {}
    for o in outputs:
        valid, reasons = _validate_output(prompt, o, validated)
        if valid is True:
            good_outputs.append(o)
            continue
        _log_failed_output(o, reasons)
        errors.append((o, reasons))
        for node_id, result in validated.items():
            if result[0] is not True and len(result[1]) > 0:
                if node_id not in node_errors:
                    node_errors[node_id] = {"errors": result[1], "dependent_outputs": [],
                                            "class_type": prompt[node_id]["class_type"]}
                    _log_node_errors(prompt[node_id]["class_type"], node_id, result[1])
                node_errors[node_id]["dependent_outputs"].append(o)
        logging.error("Output will be ignored")

    if len(good_outputs) == 0:
        details = "\n".join(f"{e['message']}: {e['details']}" for _, errs in errors for e in errs)
        return (False, _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details, {}),
                [], node_errors)
    return (True, None, good_outputs, node_errors)


def _validate_output(prompt: dict, o: str, validated: dict) -> tuple[bool, list[dict]]:
    try:
        m = validate_inputs(prompt, o, validated)
        return m[0], m[1]
    except Exception as ex:  # noqa: BLE001 - e.g. KeyError for a link to a missing node
        typ, _, tb = sys.exc_info()
        reasons = [_error("exception_during_validation", "Exception when validating node", str(ex),
                          {"exception_type": full_type_name(typ), "traceback": traceback.format_tb(tb)})]
        validated[o] = (False, reasons, o)
        return False, reasons


def _log_failed_output(o: str, reasons: list[dict]) -> None:
    logging.error(f"Failed to validate prompt for output {o}:")
    if reasons:
        logging.error("* (prompt):")
        for reason in reasons:
            logging.error(f"  - {reason['message']}: {reason['details']}")


def _log_node_errors(class_type: str, node_id: str, reasons: list[dict]) -> None:
    logging.error(f"* {class_type} {node_id}:")
    for reason in reasons:
        logging.error(f"  - {reason['message']}: {reason['details']}")
