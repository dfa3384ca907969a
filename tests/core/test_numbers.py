"""Numbers as a person says them (English), table-driven."""

from __future__ import annotations

import pytest

from service.core.normalizer import speakable
from service.core.numbers import speak_numbers

CASES = [
    # money
    ("It costs $3.50 today.", "It costs three dollars and fifty cents today."),
    ("That is $1,200.50 in total.", "That is one thousand two hundred dollars and fifty cents in total."),
    ("Only $1.", "Only one dollar."),
    ("Just $0.99 now.", "Just ninety-nine cents now."),
    ("Just $0.01.", "Just one cent."),
    ("$5 and $10.00", "five dollars and ten dollars"),
    ("About $2.5 million.", "About two point five million dollars."),
    ("A $1.5 bn deal.", "A one point five billion dollars deal."),
    ("It made $3k.", "It made three thousand dollars."),
    ("Pay €20 now.", "Pay twenty euros now."),
    ("Pay €1.05.", "Pay one euro and five cents."),
    ("Pay £3.50.", "Pay three pounds and fifty pence."),
    ("It is ¥500.", "It is five hundred yen."),
    ("A $1,000,000 prize.", "A one million dollars prize."),
    # percentages
    ("It rose 25%.", "It rose twenty-five percent."),
    ("It rose 3.5% more.", "It rose three point five percent more."),
    ("It is 100%!", "It is one hundred percent!"),
    ("A -2% change.", "A minus two percent change."),
    # dates
    ("On Jan. 5th, 2024, we met.", "On January fifth, twenty twenty-four, we met."),
    ("On January 5, 2024 we met.", "On January fifth, twenty twenty-four we met."),
    ("March 3rd", "March third"),
    ("By Sept. 30 at the latest.", "By September thirtieth at the latest."),
    ("Due 2024-01-05.", "Due January fifth, twenty twenty-four."),
    ("Due 1/5/2024.", "Due January fifth, twenty twenty-four."),
    ("The 5th of January 2024.", "The fifth of January, twenty twenty-four."),
    ("On 5 March, we go.", "On the fifth of March, we go."),
    ("In May 2024 it opened.", "In May twenty twenty-four it opened."),
    ("Dec 25", "December twenty-fifth"),
    # times
    ("Meet at 5:30 p.m. on Friday.", "Meet at five thirty P M on Friday."),
    ("Meet at 5:30 p.m.", "Meet at five thirty P M."),
    ("Meet at 5:30 p.m. Bring food.", "Meet at five thirty P M. Bring food."),
    ("Meet at 5:05.", "Meet at five oh five."),
    ("At 17:45.", "At seventeen forty-five."),
    ("At 17:00.", "At seventeen hundred."),
    ("At 12:00.", "At twelve o'clock."),
    ("At 5pm.", "At five P M."),
    ("At 11 a.m. tomorrow.", "At eleven A M tomorrow."),
    ("At 9:15am sharp.", "At nine fifteen A M sharp."),
    # ordinals
    ("The 1st and the 2nd.", "The first and the second."),
    ("The 23rd time.", "The twenty-third time."),
    ("The 101st floor.", "The one hundred and first floor."),
    ("Her 12th birthday.", "Her twelfth birthday."),
    # units
    ("It is 5 km away.", "It is five kilometers away."),
    ("It weighs 1 kg.", "It weighs one kilogram."),
    ("It is 20°C.", "It is twenty degrees Celsius."),
    ("It is 72 °F.", "It is seventy-two degrees Fahrenheit."),
    ("Temp -5°C.", "Temp minus five degrees Celsius."),
    ("A 2.5 GB file.", "A two point five gigabytes file."),
    ("Use 10 MB.", "Use ten megabytes."),
    ("Drive 60 mph.", "Drive sixty miles per hour."),
    ("Add 250 ml of milk.", "Add two hundred and fifty milliliters of milk."),
    ("It takes 2 hrs.", "It takes two hours."),
    ("It is 6 ft tall.", "It is six feet tall."),
    # phone numbers
    ("Call 555-123-4567.", "Call five five five, one two three, four five six seven."),
    ("Call +1 (555) 123-4567.", "Call plus one, five five five, one two three, four five six seven."),
    ("Call 555.123.4567 now.", "Call five five five, one two three, four five six seven now."),
    # years
    ("Born in 1999.", "Born in nineteen ninety-nine."),
    ("Since 2005 it grew.", "Since two thousand and five it grew."),
    ("Built in 1905.", "Built in nineteen oh-five."),
    ("In the 1990s.", "In the nineteen nineties."),
    ("In the 1980's.", "In the nineteen eighties."),
    ("In 44 BC.", "In forty-four B C."),
    ("The year 2000.", "The year two thousand."),
    # plain numbers
    ("I have 2 cats.", "I have two cats."),
    ("It has 1,234 pages.", "It has one thousand two hundred and thirty-four pages."),
    ("Pi is 3.14.", "Pi is three point one four."),
    ("A score of 3.50 points.", "A score of three point five zero points."),
    ("It fell to -5.", "It fell to minus five."),
    ("Ages 5-10.", "Ages five to ten."),
    ("Pages 10–20.", "Pages ten to twenty."),
    ("Route 66.", "Route sixty-six."),
    ("One million is 1,000,000.", "One million is one million."),
    # left alone
    ("Version 1.2.3 is out.", "Version 1.2.3 is out."),
    ("See example.50.com today.", "See example.50.com today."),
    ("Use x2 and A4 paper.", "Use x2 and A4 paper."),
    ("No digits here.", "No digits here."),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_numbers_are_spoken_as_a_person_says_them(text: str, expected: str) -> None:
    assert speak_numbers(text, "en_US") == expected


def test_day_and_month_order_follow_the_voice() -> None:
    assert speak_numbers("Due 5/1/2024.", "en_US") == "Due May first, twenty twenty-four."
    assert speak_numbers("Due 5/1/2024.", "en_GB") == "Due January fifth, twenty twenty-four."


@pytest.mark.parametrize("language", ["de_DE", "fr_FR", "multilingual", ""])
def test_other_languages_pass_through_until_they_have_rules(language: str) -> None:
    assert speak_numbers("Es kostet 3,50 € am 5.1.2024.", language) == "Es kostet 3,50 € am 5.1.2024."


def test_the_tts_reads_words_and_the_captions_keep_the_digits() -> None:
    assert speakable("It costs **$3.50** on Jan. 5th, 2024.", "en_US") == (
        "It costs three dollars and fifty cents on January fifth, twenty twenty-four."
    )


def test_long_digit_runs_cost_little() -> None:
    text = "1" * 5000 + " and " + "$9," * 2000
    assert speak_numbers(text, "en_US")  # num2words copes; nothing is quadratic
