"""Numbers as a person says them: money, percentages, dates, times, ordinals, units, phone numbers,
years and plain numbers, written out in words for the TTS engine (English; the voice's language
decides, and other languages pass through unchanged until they have rules).

TTS engines read digits their own way, often wrongly ("$3.50": "dollar three point five zero"). The
words come from num2words; the rules for what a string of digits *is* are ours. Pure, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from num2words import num2words

__all__ = ["speak_numbers"]

_MONTHS = "January February March April May June July August September October November December".split()
_MONTH_BY_PREFIX = {m[:3].lower(): m for m in _MONTHS} | {"sept": "September"}
_MONTH = r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sept?(?:ember)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"  # noqa: E501
_CURRENCIES = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "¥": ("yen", "yen", "", ""),
}
_SCALES = {
    "k": "thousand",
    "thousand": "thousand",
    "m": "million",
    "mn": "million",
    "million": "million",
    "b": "billion",
    "bn": "billion",
    "billion": "billion",
    "trillion": "trillion",
}
_UNITS = {
    "km": ("kilometer", "kilometers"),
    "cm": ("centimeter", "centimeters"),
    "mm": ("millimeter", "millimeters"),
    "kg": ("kilogram", "kilograms"),
    "mg": ("milligram", "milligrams"),
    "lb": ("pound", "pounds"),
    "lbs": ("pound", "pounds"),
    "oz": ("ounce", "ounces"),
    "ft": ("foot", "feet"),
    "mi": ("mile", "miles"),
    "mph": ("mile per hour", "miles per hour"),
    "km/h": ("kilometer per hour", "kilometers per hour"),
    "kph": ("kilometer per hour", "kilometers per hour"),
    "ml": ("milliliter", "milliliters"),
    "°c": ("degree Celsius", "degrees Celsius"),
    "°f": ("degree Fahrenheit", "degrees Fahrenheit"),
    "°": ("degree", "degrees"),
    "kb": ("kilobyte", "kilobytes"),
    "mb": ("megabyte", "megabytes"),
    "gb": ("gigabyte", "gigabytes"),
    "tb": ("terabyte", "terabytes"),
    "hz": ("hertz", "hertz"),
    "khz": ("kilohertz", "kilohertz"),
    "mhz": ("megahertz", "megahertz"),
    "ghz": ("gigahertz", "gigahertz"),
    "kw": ("kilowatt", "kilowatts"),
    "kwh": ("kilowatt hour", "kilowatt hours"),
    "ms": ("millisecond", "milliseconds"),
    "sec": ("second", "seconds"),
    "secs": ("second", "seconds"),
    "min": ("minute", "minutes"),
    "mins": ("minute", "minutes"),
    "hr": ("hour", "hours"),
    "hrs": ("hour", "hours"),
}
_UNIT = "|".join(sorted((re.escape(u) for u in _UNITS), key=len, reverse=True))
_YEAR_BEFORE = r"(?:in|since|by|from|until|till|of|before|after|around|circa|during|year|early|late|mid)"

_NUM = r"\d{1,3}(?:,\d{3})+|\d+"
_PATTERN = re.compile(
    "|".join(
        (
            # $1,200.50, €20, £3.50, $2.5 million, $3k
            rf"(?P<money>(?P<cur>[$€£¥])\s?(?P<whole>{_NUM})(?:\.(?P<frac>\d+))?"
            r"(?:\s?(?P<scale>thousand|million|billion|trillion|[kK]|[mM]n?|[bB]n?)\b)?)",
            # +1 (555) 123-4567, 555-123-4567, 555.123.4567
            r"(?P<phone>(?<![\w.])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?!\w|[.-]\d))",
            # 2024-01-05
            r"(?P<iso>\b(?P<iy>1\d{3}|20\d{2})-(?P<im>0[1-9]|1[0-2])-(?P<id>0[1-9]|[12]\d|3[01])\b)",
            # 1/5/2024 (month first for en_US, day first elsewhere)
            r"(?P<slash>\b(?P<sa>\d{1,2})/(?P<sb>\d{1,2})/(?P<sc>\d{4})\b)",
            # Jan. 5th, 2024 / January 5 / March 3rd 2024
            rf"(?P<mdy>\b(?P<mon>{_MONTH})\.?\s+(?P<day>[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?\b(?:,?\s+(?P<year>1\d{{3}}|20\d{{2}})\b)?)",  # noqa: E501
            # 5th of January, 2024 / 5 January 2024
            rf"(?P<dmy>\b(?P<day2>[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?\s+(?:of\s+)?(?P<mon2>{_MONTH})\b\.?(?:,?\s+(?P<year2>1\d{{3}}|20\d{{2}})\b)?)",  # noqa: E501
            # May 2024
            rf"(?P<my>\b(?P<mon3>{_MONTH})\s+(?P<year3>1\d{{3}}|20\d{{2}})\b)",
            # 5:30, 17:45, 5:30 p.m., 5:30pm
            r"(?P<time>\b(?P<h>[01]?\d|2[0-3]):(?P<mi>[0-5]\d)(?::[0-5]\d)?(?:\s?(?P<ap>[aApP])\.?\s?[mM]\b(?P<apdot>\.)?)?)",
            # 5 p.m., 11am
            r"(?P<hour>\b(?P<h2>1[0-2]|0?[1-9])\s?(?P<ap2>[aApP])\.?\s?[mM]\b(?P<apdot2>\.)?)",
            # 25%, 3.5 %
            r"(?P<percent>(?<![\w.])(?P<pneg>-)?(?P<pnum>\d+(?:\.\d+)?)\s?%)",
            # the 1990s
            r"(?P<decade>\b(?P<dec>1\d|20)(?P<decd>\d)0(?:'?s)\b)",
            # 1st, 22nd, 103rd, 5th
            r"(?P<ordinal>\b(?P<ord>\d+)(?:st|nd|rd|th)\b)",
            # 5 km, 20°C, 2.5 GB
            rf"(?P<unit>(?<![\w.])(?P<uneg>-)?(?P<unum>{_NUM}(?:\.\d+)?)\s?(?P<uname>(?i:{_UNIT}))(?![\w/]))",
            # in 1999, 1066 AD
            rf"(?P<yearctx>\b(?P<yw>{_YEAR_BEFORE})\s+(?P<yv>1[1-9]\d\d|20\d\d)\b(?![\d,.]\d))",
            r"(?P<era>\b(?P<ev>\d{1,4})\s?(?P<en>BC|AD|BCE|CE)\b)",
            # 5-10, 5–10
            r"(?P<range>(?<![\w.,-])(?P<r1>\d+)[-–](?P<r2>\d+)(?![\w.,]\d|[-–]))",
            # 1,234.5, -5, 42, 3.14
            rf"(?P<number>(?<![\w.,])(?P<nneg>-(?=\d))?(?P<nwhole>{_NUM})(?:\.(?P<nfrac>\d+))?(?![\w]|[.,]\d))",
        )
    )
)


_MAX_CARDINAL = 10**15
_MAX_DIGITS = 30


def _words(number: int) -> str:
    """num2words' cardinal, without the commas that would make a voice pause inside a number; past
    the trillions, the digits one by one; past ``_MAX_DIGITS`` digits, ValueError (left as written)."""
    if number >= _MAX_CARDINAL:
        digits = str(number)
        if len(digits) > _MAX_DIGITS:
            raise ValueError("too many digits to read out")
        return " ".join(_words(int(d)) for d in digits)
    return str(num2words(number)).replace(",", "")


def _integer(digits: str) -> int:
    return int(digits.replace(",", ""))


def _decimal(whole: str, frac: str | None) -> str:
    """A number as read aloud: the digits after the point one by one ("three point five zero")."""
    spoken = _words(_integer(whole))
    if frac:
        spoken += " point " + " ".join(_words(int(d)) for d in frac)
    return spoken


def _plural(count_is_one: bool, one: str, many: str) -> str:
    return one if count_is_one else many


def _money(m: re.Match[str]) -> str:
    one, many, cent, cents = _CURRENCIES[m["cur"]]
    whole, frac, scale = m["whole"], m["frac"], m["scale"]
    if scale:
        return f"{_decimal(whole, frac)} {_SCALES[scale.lower()]} {many}"
    units = _integer(whole)
    if frac is not None and len(frac) != 2 or not cent:
        return f"{_decimal(whole, frac)} {_plural(units == 1 and not frac, one, many)}"
    hundredths = int(frac) if frac else 0
    spoken_units = f"{_words(units)} {_plural(units == 1, one, many)}"
    if not hundredths:
        return spoken_units
    spoken_cents = f"{_words(hundredths)} {_plural(hundredths == 1, cent, cents)}"
    return spoken_cents if units == 0 else f"{spoken_units} and {spoken_cents}"


def _digits(text: str) -> str:
    return " ".join(_words(int(d)) for d in text)


def _phone(m: re.Match[str]) -> str:
    groups = re.findall(r"\+?\d+", m["phone"])
    spoken = [("plus " if g.startswith("+") else "") + _digits(g.lstrip("+")) for g in groups]
    return ", ".join(spoken)


def _year(value: int) -> str:
    return str(num2words(value, to="year")).replace(",", "")


def _ordinal(value: int) -> str:
    return str(num2words(value, to="ordinal")).replace(",", "")


def _month(name: str) -> str:
    return _MONTH_BY_PREFIX[name[:4].lower() if name[:4].lower() == "sept" else name[:3].lower()]


def _date(month: str, day: int, year: str | None) -> str:
    spoken = f"{month} {_ordinal(day)}"
    return f"{spoken}, {_year(int(year))}" if year else spoken


def _ampm(letter: str | None, dot: str | None, after: str) -> str:
    if not letter:
        return ""
    spoken = " A M" if letter.lower() == "a" else " P M"
    # The period of "p.m." also ends a sentence when nothing (or a new sentence) follows.
    if dot and (not after.strip() or after.lstrip()[:1].isupper()):
        spoken += "."
    return spoken


def _time(m: re.Match[str], after: str) -> str:
    hour, minute = int(m["h"]), int(m["mi"])
    ampm = _ampm(m["ap"], m["apdot"], after)
    if minute == 0:
        spoken = f"{_words(hour)} o'clock" if not ampm and hour <= 12 else _words(hour)
        if not ampm and hour > 12:
            spoken += " hundred"
    elif minute < 10:
        spoken = f"{_words(hour)} oh {_words(minute)}"
    else:
        spoken = f"{_words(hour)} {_words(minute)}"
    return spoken + ampm


def _decade(m: re.Match[str]) -> str:
    year = _year(int(f"{m['dec']}{m['decd']}0"))
    if year.endswith("y"):
        return year[:-1] + "ies"
    return year + "s"


def _unit(m: re.Match[str]) -> str:
    one, many = _UNITS[m["uname"].lower()]
    whole, _, frac = m["unum"].partition(".")
    number = _decimal(whole, frac or None)
    is_one = _integer(whole) == 1 and not frac and not m["uneg"]
    return ("minus " if m["uneg"] else "") + f"{number} {_plural(is_one, one, many)}"


def _spoken(m: re.Match[str], us: bool) -> str:
    try:
        return _spoken_as(m, us)
    except (ValueError, OverflowError, KeyError):  # a number too long to read out, an unknown form
        return m[0]


def _spoken_as(m: re.Match[str], us: bool) -> str:
    kind = m.lastgroup
    after = m.string[m.end() : m.end() + 3]
    if kind == "money":
        return _money(m)
    if kind == "phone":
        return _phone(m)
    if kind == "iso":
        return _date(_MONTHS[int(m["im"]) - 1], int(m["id"]), m["iy"])
    if kind == "slash":
        a, b = int(m["sa"]), int(m["sb"])
        month, day = (a, b) if us else (b, a)
        if not (1 <= month <= 12 and 1 <= day <= 31):
            return m[0]
        return _date(_MONTHS[month - 1], day, m["sc"])
    if kind == "mdy":
        return _date(_month(m["mon"]), int(m["day"]), m["year"])
    if kind == "dmy":
        before = m.string[max(0, m.start() - 4) : m.start()].lower()
        spoken = f"{'' if before.endswith('the ') else 'the '}{_ordinal(int(m['day2']))} of {_month(m['mon2'])}"
        return f"{spoken}, {_year(int(m['year2']))}" if m["year2"] else spoken
    if kind == "my":
        return f"{_month(m['mon3'])} {_year(int(m['year3']))}"
    if kind == "time":
        return _time(m, after)
    if kind == "hour":
        return _words(int(m["h2"])) + _ampm(m["ap2"], m["apdot2"], after)
    if kind == "percent":
        return ("minus " if m["pneg"] else "") + _decimal(*_split(m["pnum"])) + " percent"
    if kind == "decade":
        return _decade(m)
    if kind == "ordinal":
        return _ordinal(int(m["ord"]))
    if kind == "unit":
        return _unit(m)
    if kind == "yearctx":
        return f"{m['yw']} {_year(int(m['yv']))}"
    if kind == "era":
        era = {"BC": "B C", "AD": "A D", "BCE": "B C E", "CE": "C E"}[m["en"]]
        return f"{_year(int(m['ev']))} {era}"
    if kind == "range":
        return f"{_words(int(m['r1']))} to {_words(int(m['r2']))}"
    if kind == "number":
        return ("minus " if m["nneg"] else "") + _decimal(m["nwhole"], m["nfrac"])
    return m[0]


def _split(number: str) -> tuple[str, str | None]:
    whole, _, frac = number.partition(".")
    return whole, frac or None


_ASCII_DIGIT = re.compile("[0-9]")


def speak_numbers(text: str, language: str) -> str:
    """``text`` with its numbers in words, for a voice of ``language`` (``en_US``, ``en_GB``); text
    for any other language comes back unchanged."""
    code = language.replace("-", "_").lower()
    if not code.startswith("en"):
        return text
    if not (_ASCII_DIGIT.search(text) if text.isascii() else any(c.isdigit() for c in text)):
        return text
    us = code in ("en", "en_us")
    replace: Callable[[re.Match[str]], str] = lambda m: _spoken(m, us)  # noqa: E731
    return _PATTERN.sub(replace, text)
