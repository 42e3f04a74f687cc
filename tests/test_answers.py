from vkr_core.answers import answers_match, option_letter


def test_option_letters_are_read_from_common_answer_shapes():
    assert [option_letter(a) for a in ["B", "B.", "(B)", "B. the ball", " c ", "Because"]] == [
        "B",
        "B",
        "B",
        "B",
        "C",
        None,
    ]


def test_multiple_choice_matches_by_letter_only():
    assert answers_match("multiple choice", "B", "B. It accelerates")
    assert not answers_match("multiple choice", "B", "C")
    assert not answers_match("multiple choice", "B", "the second one")


def test_open_ended_matches_after_normalisation():
    assert answers_match("open-ended", "The Maillard reaction", "maillard reaction.")
    assert answers_match("open-ended", "copper sulfate solution", "a copper sulfate solution")
    assert not answers_match("open-ended", "copper sulfate", "iron chloride")
    assert not answers_match("open-ended", "", "")
