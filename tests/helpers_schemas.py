"""JSON schemas for the structured-output tests: (what to ask for, schema), each a different shape.

Nested objects, arrays with min/max items, enums, numbers with bounds, optional fields, string
patterns and formats, $defs references, anyOf unions, constants. Strings and arrays are bounded
where a small model could otherwise run past a test's max_tokens.
"""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "minLength": 1, "maxLength": 24}
SHORT = {"type": "string", "maxLength": 16}

SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("a person with a name and an age", {
        "type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}),
    ("a yes/no answer", {"type": "object", "properties": {"answer": {"type": "boolean"}},
                         "required": ["answer"], "additionalProperties": False}),
    ("a traffic light colour", {"type": "object", "properties": {"color": {"enum": ["red", "amber", "green"]}},
                                "required": ["color"], "additionalProperties": False}),
    ("a temperature reading in Celsius", {
        "type": "object", "properties": {"celsius": {"type": "number", "minimum": -50, "maximum": 60}},
        "required": ["celsius"], "additionalProperties": False}),
    ("a list of two to four fruits", {
        "type": "object", "properties": {"fruits": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 4}},
        "required": ["fruits"], "additionalProperties": False}),
    ("a point with x and y coordinates", {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": -100, "maximum": 100},
                                         "y": {"type": "integer", "minimum": -100, "maximum": 100}},
        "required": ["x", "y"], "additionalProperties": False}),
    ("a book with a title, an author and an optional year", {
        "type": "object", "properties": {"title": NAME, "author": NAME,
                                         "year": {"type": "integer", "minimum": 1400, "maximum": 2030}},
        "required": ["title", "author"], "additionalProperties": False}),
    ("a US zip code", {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                       "required": ["zip"], "additionalProperties": False}),
    ("a hex colour code", {"type": "object", "properties": {"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
                           "required": ["hex"], "additionalProperties": False}),
    ("a user with an address (street and city)", {
        "type": "object", "properties": {
            "user": NAME,
            "address": {"type": "object", "properties": {"street": NAME, "city": NAME},
                        "required": ["street", "city"], "additionalProperties": False}},
        "required": ["user", "address"], "additionalProperties": False}),
    ("three scores between 0 and 10", {
        "type": "object", "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                               "maximum": 10},
                                                    "minItems": 3, "maxItems": 3}},
        "required": ["scores"], "additionalProperties": False}),
    ("a product with a price and a currency", {
        "type": "object", "properties": {"product": NAME,
                                         "price": {"type": "number", "minimum": 0, "maximum": 10000},
                                         "currency": {"enum": ["USD", "EUR", "GBP"]}},
        "required": ["product", "price", "currency"], "additionalProperties": False}),
    ("a date in ISO format", {"type": "object", "properties": {
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
        "required": ["date"], "additionalProperties": False}),
    ("a bare integer between 1 and 10", {"type": "integer", "minimum": 1, "maximum": 10}),
    ("a bare enum of sizes", {"enum": ["small", "medium", "large"]}),
    ("an array of at most three booleans", {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}),
    ("a rating with an optional comment", {
        "type": "object", "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5},
                                         "comment": SHORT},
        "required": ["stars"], "additionalProperties": False}),
    ("a task list of one or two tasks, each with a title and a done flag", {
        "type": "object", "properties": {"tasks": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "properties": {"title": NAME, "done": {"type": "boolean"}},
            "required": ["title", "done"], "additionalProperties": False}}},
        "required": ["tasks"], "additionalProperties": False}),
    ("a weather report", {
        "type": "object", "properties": {
            "city": NAME, "condition": {"enum": ["sunny", "cloudy", "rain", "snow"]},
            "wind_kmh": {"type": "integer", "minimum": 0, "maximum": 200}},
        "required": ["city", "condition", "wind_kmh"], "additionalProperties": False}),
    ("a value that is a number or null", {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1000}, {"type": "null"}]}},
        "required": ["value"], "additionalProperties": False}),
    ("a username of lowercase letters", {"type": "object", "properties": {
        "username": {"type": "string", "pattern": "^[a-z]{3,12}$"}}, "required": ["username"],
        "additionalProperties": False}),
    ("a matrix of two rows of two integers", {"type": "object", "properties": {"rows": {
        "type": "array", "minItems": 2, "maxItems": 2, "items": {
            "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
        "required": ["rows"], "additionalProperties": False}),
    ("an API version string", {"type": "object", "properties": {"version": {"const": "v1"}, "ok": {"type": "boolean"}},
                               "required": ["version", "ok"], "additionalProperties": False}),
    ("a percentage as a fraction", {"type": "object", "properties": {
        "fraction": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["fraction"],
        "additionalProperties": False}),
    ("a company with a CEO person object (referenced definition)", {
        "$defs": {"person": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 18,
                                                                                   "maximum": 99}},
                             "required": ["name", "age"], "additionalProperties": False}},
        "type": "object", "properties": {"company": NAME, "ceo": {"$ref": "#/$defs/person"}},
        "required": ["company", "ceo"], "additionalProperties": False}),
    ("a shape that is either a circle or a square", {"type": "object", "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "radius": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 50}},
         "required": ["kind", "radius"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1,
                                                                                "maximum": 50}},
         "required": ["kind", "side"], "additionalProperties": False}]}},
        "required": ["shape"], "additionalProperties": False}),
    ("tags: one to three short words", {"type": "object", "properties": {"tags": {
        "type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,10}$"}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False}),
    ("an email address", {"type": "object", "properties": {"email": {
        "type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.(com|org)$"}}, "required": ["email"],
        "additionalProperties": False}),
    ("a server config with a port and optional debug flag", {
        "type": "object", "properties": {"host": {"type": "string", "pattern": "^[a-z]{1,12}$"},
                                         "port": {"type": "integer", "minimum": 1024, "maximum": 65535},
                                         "debug": {"type": "boolean"}},
        "required": ["host", "port"], "additionalProperties": False}),
    ("a pair of a word and its length", {"type": "array", "prefixItems": [NAME, {"type": "integer", "minimum": 0,
                                                                                  "maximum": 30}],
                                         "items": False, "minItems": 2}),
    ("an order with line items", {
        "type": "object", "properties": {
            "order_id": {"type": "integer", "minimum": 1, "maximum": 99999},
            "status": {"enum": ["new", "paid", "shipped"]},
            "lines": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
                "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                                 "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["order_id", "status", "lines"], "additionalProperties": False}),
    ("a deeply nested settings object", {"type": "object", "properties": {"a": {
        "type": "object", "properties": {"b": {"type": "object", "properties": {
            "c": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["c"], "additionalProperties": False}},
        "required": ["b"], "additionalProperties": False}}, "required": ["a"], "additionalProperties": False}),
    ("a short sentence", {"type": "object", "properties": {"text": {"type": "string", "minLength": 1,
                                                                    "maxLength": 40}},
                          "required": ["text"], "additionalProperties": False}),
    ("a multiple of five", {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                                   "maximum": 100, "multipleOf": 5}},
                            "required": ["n"], "additionalProperties": False}),
]
