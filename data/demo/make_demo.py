"""
Writes the SYNTHETIC demo dataset (train.jsonl, test.jsonl next to this file).

Each consultation is composed from the small hand-written bank below: the patient names a complaint,
the pharmacist asks 1-4 questions, each about one attribute of it, and ends with a recommendation.
Because we compose the dialogue, we know which attribute every question asks about, so info_truth
needs no LLM. Samples are cut with preprocess.split_session / decision_truth, the same code that
cuts real logs. Stdlib only and seeded, so rerunning gives identical files:

    python data/demo/make_demo.py
"""

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, for preprocess.py
from preprocess import decision_truth, expert_turn, split_session  # noqa: E402

SEED = 1234
TRAIN_SAMPLES = 240  # sessions go to train until it has this many samples, then to test
TEST_SAMPLES = 60

# -----------------------------------------------------------------------------
# the bank: field -> (pharmacist question, [(clinical value, patient answer), ...])

GENERIC = {
    "symptom severity": (
        "How bad is it: mild, bothersome but manageable, or bad enough to stop you doing things?",
        [("mild", "Honestly it's fairly mild."),
         ("moderate", "It's annoying, but I can manage."),
         ("severe", "It's bad, I can hardly get through the day.")]),
    "symptom duration": (
        "How long has it been going on: a day or two, about a week, or longer?",
        [("1-2 days", "It started yesterday."),
         ("about 1 week", "About a week now."),
         ("over 2 weeks", "More than two weeks, it just won't go away.")]),
}

COMPLAINTS = [
    dict(
        diagn="Acute pharyngitis",
        openings=["Hi, my throat is really sore.", "Hello, I have a sore throat, what can I take?"],
        fields={
            "symptom nature": (
                "Does it feel scratchy, burning, or does it mostly hurt when you swallow?",
                [("scratchy", "It's scratchy, like something is stuck in there."),
                 ("burning pain", "It burns, especially in the morning."),
                 ("pain on swallowing", "It mostly hurts when I swallow.")]),
            "symptom location": (
                "Is the pain on one side, on both sides, or up near the tonsils?",
                [("one side of the throat", "Only on the left side."),
                 ("both sides of the throat", "Both sides hurt about the same."),
                 ("tonsils", "Up by the tonsils, they look a bit swollen.")]),
            "trigger": (
                "Did it start with a cold, after using your voice a lot, or out of nowhere?",
                [("after a cold", "It began when I caught a cold last week."),
                 ("voice strain", "I was shouting at a football match."),
                 ("no clear trigger", "It just came on, I can't think of a reason.")]),
            "symptom": (
                "Do you also have a fever or a cough, or only the sore throat?",
                [("fever", "I've had a slight fever too, around 38."),
                 ("cough", "I'm coughing a little as well."),
                 ("no other symptoms", "No, just the throat.")]),
        },
        advice="Thanks. Lozenges with a mild local anaesthetic plus paracetamol for the pain should "
               "help; drink warm fluids and rest your voice. If you cannot swallow or it lasts "
               "beyond a week, please see a doctor.",
    ),
    dict(
        diagn="Acute cough",
        openings=["I have a cough I can't shake off.", "Hello, I need something for a cough."],
        fields={
            "symptom nature": (
                "Is it a dry, tickly cough, or do you cough up phlegm?",
                [("dry cough", "It's dry, a tickle in my throat."),
                 ("productive cough, clear sputum", "I bring up some clear phlegm."),
                 ("productive cough, yellow sputum", "There's thick yellow phlegm.")]),
            "symptom location": (
                "Does the tickle come from your throat, or does it feel deep in your chest?",
                [("throat", "More in the throat."),
                 ("chest", "It feels deep in my chest.")]),
            "trigger": (
                "Is it worse at night, when you lie down, or when you go out into cold air?",
                [("worse at night", "Nights are the worst, it keeps me awake."),
                 ("worse lying down", "It gets worse as soon as I lie down."),
                 ("cold air", "Going out in the cold sets it off.")]),
            "symptom": (
                "Any fever, runny nose or shortness of breath with it, or only the cough?",
                [("fever", "I had a fever two nights ago."),
                 ("runny nose", "My nose is running too."),
                 ("no other symptoms", "No, only the cough.")]),
        },
        advice="For this cough an over-the-counter cough syrup matched to the type of cough, plenty "
               "of fluids and honey in warm water are a good start. If you get short of breath or it "
               "lasts more than three weeks, please see a doctor.",
    ),
    dict(
        diagn="Tension-type headache",
        openings=["I keep getting headaches.", "Hi, my head has been hurting a lot lately."],
        fields={
            "symptom nature": (
                "Is it a pressing, band-like pain, a throbbing pain, or sharp stabs?",
                [("pressing, band-like", "Like a tight band round my head."),
                 ("throbbing", "It throbs with my heartbeat."),
                 ("stabbing", "Sharp stabs that come and go.")]),
            "symptom location": (
                "Where is it: your forehead, one side of the head, or the back of the head and neck?",
                [("forehead", "Across my forehead."),
                 ("one side of the head", "Only on the right side."),
                 ("back of the head and neck", "At the back, going down into my neck.")]),
            "trigger": (
                "Does it come after long screen time, a bad night's sleep, or skipped meals?",
                [("screen work", "After a long day at the computer."),
                 ("lack of sleep", "When I haven't slept well."),
                 ("skipped meals", "When I skip lunch.")]),
            "symptom": (
                "Do you get nausea or sensitivity to light with it, or nothing else?",
                [("nausea", "I feel a bit sick with it."),
                 ("photophobia", "Bright light makes it worse."),
                 ("no other symptoms", "Nothing else, only the pain.")]),
        },
        advice="Ibuprofen or paracetamol at the dose on the pack should ease it; regular breaks "
               "from the screen, water and sleep help prevent it. A sudden very severe headache or "
               "one with fever and a stiff neck needs a doctor straight away.",
    ),
    dict(
        diagn="Gastro-oesophageal reflux",
        openings=["I get heartburn almost every day.", "Hello, something burns in my chest after eating."],
        fields={
            "symptom nature": (
                "Is it a burning feeling, a sour taste coming up, or more a pressure?",
                [("burning", "A burning feeling."),
                 ("acid regurgitation", "Sour stuff comes up into my mouth."),
                 ("pressure", "More like a pressure.")]),
            "symptom location": (
                "Is it behind the breastbone, in the upper stomach, or up in the throat?",
                [("behind the breastbone", "Right behind my breastbone."),
                 ("upper abdomen", "In the upper part of my stomach."),
                 ("throat", "It rises up into my throat.")]),
            "trigger": (
                "Does it come after big or spicy meals, when you lie down, or after coffee?",
                [("large or spicy meals", "After a big dinner or anything spicy."),
                 ("lying down", "When I lie down at night."),
                 ("coffee", "After my morning coffee.")]),
            "symptom": (
                "Do you also feel bloated or sick, or is it only the burning?",
                [("bloating", "I feel bloated as well."),
                 ("nausea", "Sometimes a bit nauseous."),
                 ("no other symptoms", "Only the burning.")]),
        },
        advice="An antacid after meals, or a short course of an over-the-counter acid reducer, should "
               "help; smaller meals and not eating late make a difference too. If it hurts to "
               "swallow or you lose weight, please see a doctor.",
    ),
    dict(
        diagn="Acute diarrhoea",
        openings=["I have diarrhoea.", "Hi, my stomach is upset, I need something for diarrhoea."],
        fields={
            "symptom nature": (
                "Are the stools watery, loose but formed, or with mucus?",
                [("watery stools", "Completely watery."),
                 ("loose stools", "Loose, but not like water."),
                 ("stools with mucus", "There's some mucus in it.")]),
            "trigger": (
                "Did it start after eating out, after travelling, or after a new medicine?",
                [("food eaten out", "After eating at a street stall."),
                 ("travel", "Since I came back from a trip."),
                 ("antibiotics", "Since I started antibiotics.")]),
            "symptom": (
                "Do you have a fever or stomach cramps with it, or neither?",
                [("fever", "I have a mild fever."),
                 ("abdominal cramps", "Yes, cramps before I go."),
                 ("no other symptoms", "Neither.")]),
        },
        advice="The main thing is to replace fluids: oral rehydration salts after each loose stool. "
               "Loperamide can reduce the frequency if there is no fever or blood. Blood in the "
               "stool or signs of dehydration need a doctor.",
    ),
    dict(
        diagn="Allergic rhinitis",
        openings=["My nose won't stop running and I sneeze all day.", "Hello, I think I have hay fever."],
        fields={
            "symptom nature": (
                "Is it mostly sneezing, a runny nose, or a blocked nose?",
                [("sneezing", "Lots of sneezing."),
                 ("clear rhinorrhoea", "My nose keeps running, it's clear."),
                 ("nasal congestion", "My nose is blocked.")]),
            "symptom location": (
                "Is it only your nose, or are your eyes itchy and watery too?",
                [("nose only", "Just my nose."),
                 ("nose and eyes", "My eyes itch and water too.")]),
            "trigger": (
                "Is it worse outdoors in spring, around dust at home, or near animals?",
                [("pollen", "Worse outside, especially in spring."),
                 ("house dust", "When I clean the house."),
                 ("pet dander", "When I visit my friend who has a cat.")]),
            "symptom": (
                "Any fever or sore throat with it, or only the nose?",
                [("no fever", "No fever, only the nose."),
                 ("itchy throat", "My throat is itchy too.")]),
        },
        advice="A non-drowsy antihistamine such as cetirizine or loratadine once a day should help, "
               "and a steroid nasal spray if the nose is blocked. Try to limit contact with what "
               "sets it off.",
    ),
    dict(
        diagn="Lower back strain",
        openings=["My back hurts.", "Hi, I've got back pain, can you recommend something?"],
        fields={
            "symptom nature": (
                "Is the pain a dull ache, sharp, or shooting down a leg?",
                [("dull ache", "A dull ache."),
                 ("sharp pain on movement", "Sharp whenever I move."),
                 ("radiating down the leg", "It shoots down my left leg.")]),
            "symptom location": (
                "Is it in the lower back, the middle, or between the shoulder blades?",
                [("lower back", "Lower back, just above the belt."),
                 ("mid back", "In the middle of my back."),
                 ("between the shoulder blades", "Between my shoulder blades.")]),
            "trigger": (
                "Did it start after lifting something, after sitting for long, or for no reason?",
                [("lifting", "I lifted a heavy box."),
                 ("prolonged sitting", "After long hours at my desk."),
                 ("no clear trigger", "It came on by itself.")]),
            "symptom": (
                "Any numbness or tingling, or only the pain?",
                [("leg numbness", "A bit of numbness in my leg."),
                 ("no other symptoms", "Only the pain.")]),
        },
        advice="Ibuprofen gel on the painful area, or ibuprofen tablets with food, plus gentle "
               "movement rather than bed rest, usually helps. Numbness around the groin or trouble "
               "passing urine needs urgent medical care.",
    ),
    dict(
        diagn="Insomnia",
        openings=["I can't sleep properly.", "Hello, is there something that helps with sleep?"],
        fields={
            "symptom nature": (
                "Is it hard to fall asleep, do you wake in the night, or do you wake too early?",
                [("difficulty falling asleep", "I lie awake for hours before I fall asleep."),
                 ("night waking", "I wake up several times a night."),
                 ("early waking", "I wake at four and can't get back to sleep.")]),
            "trigger": (
                "Is something keeping you up: stress, coffee late in the day, or shift work?",
                [("stress", "Stress at work, my mind keeps racing."),
                 ("evening caffeine", "I drink coffee in the evening."),
                 ("shift work", "I've been working night shifts.")]),
            "symptom": (
                "During the day, do you feel drowsy, low in mood, or fine?",
                [("daytime sleepiness", "I'm exhausted during the day."),
                 ("low mood", "I've been feeling low."),
                 ("no daytime symptoms", "During the day I'm fine.")]),
        },
        advice="A regular bedtime, no screens or caffeine in the evening and a short course of an "
               "over-the-counter sleep aid can help for a few nights. If it goes on for weeks or "
               "your mood is low, please talk to a doctor.",
    ),
    dict(
        diagn="Contact dermatitis",
        openings=["I have a rash.", "Hi, some red patches appeared on my skin."],
        fields={
            "symptom nature": (
                "Is it itchy, does it burn, or are there small blisters?",
                [("itchy", "It itches a lot."),
                 ("burning", "It burns."),
                 ("small blisters", "There are small blisters.")]),
            "symptom location": (
                "Where is it: on your hands, your face, or your body?",
                [("hands", "On my hands."),
                 ("face", "On my face, around the cheeks."),
                 ("trunk", "On my chest and back.")]),
            "trigger": (
                "Before it appeared, did you use a new soap or cream, touch plants, or eat something new?",
                [("new soap", "I started using a new soap."),
                 ("plants", "I was gardening last weekend."),
                 ("new food", "I had seafood the day before.")]),
            "symptom": (
                "Is there any swelling or fever, or just the rash?",
                [("no other symptoms", "Just the rash."),
                 ("local swelling", "The skin around it is a bit swollen.")]),
        },
        advice="Stop using whatever may have caused it, apply a mild hydrocortisone cream twice a "
               "day for up to a week and take an antihistamine for the itch. Swelling of the lips "
               "or trouble breathing needs emergency care.",
    ),
    dict(
        diagn="Constipation",
        openings=["I'm constipated.", "Hello, I need something for constipation."],
        fields={
            "symptom nature": (
                "Are the stools hard, is it painful to pass them, or do you just go rarely?",
                [("hard stools", "They're hard."),
                 ("painful defecation", "It hurts to go."),
                 ("infrequent stools", "I only go every four days or so.")]),
            "trigger": (
                "Has anything changed: your diet, how much you drink, or a new medicine?",
                [("low-fibre diet", "I've been eating mostly takeaway."),
                 ("low fluid intake", "I don't drink much water."),
                 ("iron tablets", "I started iron tablets.")]),
            "symptom": (
                "Any bloating, or nothing else?",
                [("bloating", "I feel bloated."),
                 ("no other symptoms", "Nothing else.")]),
        },
        advice="A bulk-forming laxative such as ispaghula husk, with plenty of water, fruit and "
               "vegetables, is the gentlest start; an osmotic laxative if that is not enough. Blood "
               "in the stool or weight loss needs a doctor.",
    ),
    dict(
        diagn="Common cold",
        openings=["I think I've caught a cold.", "Hi, I have a cold coming on."],
        fields={
            "symptom nature": (
                "Is your nose blocked, running clear, or running thick and yellow?",
                [("nasal congestion", "Blocked, I can't breathe through it."),
                 ("clear rhinorrhoea", "Runny and clear."),
                 ("thick yellow discharge", "Thick and yellowish.")]),
            "trigger": (
                "Has anyone around you been ill, or did you get cold or wet recently?",
                [("sick contact", "My kids all have colds."),
                 ("cold exposure", "I got soaked in the rain.")]),
            "symptom": (
                "Do you have a fever, body aches, or a sore throat?",
                [("fever", "A fever of 38.2."),
                 ("body aches", "My whole body aches."),
                 ("sore throat", "My throat hurts too.")]),
        },
        advice="Paracetamol or ibuprofen for the aches and fever, a decongestant nasal spray for no "
               "more than a week, fluids and rest. It should settle within ten days; see a doctor "
               "if the fever stays high.",
    ),
]

GREETING = "Hello, I'm the pharmacist on duty. How can I help you?"
ACKS = ["I see.", "Okay, thank you.", "Got it."]
ASIDES = ["It's really getting to me.", "I hope that makes sense.", "Is that something serious?",
          "I've never had it this bad before."]
REQUESTS = ["What can I take for it?", "I'd like to buy something for it.", "Can you help?"]
SAFETY = "Before I suggest something: any drug allergies, or medicines you take regularly?"
SAFETY_ANSWERS = ["No, none.", "I'm allergic to penicillin.", "Only blood pressure tablets."]

# -----------------------------------------------------------------------------


def make_session(rng, complaint):
    """
    Compose one consultation. Returns its messages and, aligned with them, the info item each
    message asks about ("field: value", the value being the answer the patient will give), or None.
    """
    fields = {**complaint["fields"], **GENERIC}
    msgs, asks = [], []

    def say(role, content, item=None):
        msgs.append({"role": role, "content": content})
        asks.append(item)

    if rng.random() < 0.25:  # real logs often open with an automatic pharmacist greeting
        say("assistant", GREETING)
    say("user", rng.choice(complaint["openings"]))
    r = rng.random()
    if r < 0.35:  # the patient volunteers one detail, so the pharmacist must not ask it again
        field = rng.choice(sorted(fields))
        say("user", rng.choice(fields.pop(field)[1])[1])
    elif r < 0.6:
        say("user", rng.choice(REQUESTS))

    for field in rng.sample(sorted(fields), rng.randint(1, 4)):
        question, choices = fields[field]
        value, answer = rng.choice(choices)
        if rng.random() < 0.15:  # two pharmacist turns in a row: still one decision point
            say("assistant", rng.choice(ACKS))
        say("assistant", question, f"{field}: {value}")
        say("user", answer)
        if rng.random() < 0.3:  # patients often send a second message before the reply
            say("user", rng.choice(ASIDES))
    if rng.random() < 0.3:
        # Allergies and medication history are not info_truth fields (the paper leaves them out),
        # so this question carries no item and the sample just before it is dropped.
        say("assistant", SAFETY)
        say("user", rng.choice(SAFETY_ANSWERS))
    say("assistant", complaint["advice"])
    return msgs, asks


def session_samples(session_id, complaint, msgs, asks):
    """Cut a composed session into processed samples, exactly as real logs are cut."""
    samples = []
    for n, (context, future) in enumerate(split_session(msgs), 1):
        info = [item for item in asks[len(context):] if item]  # what the pharmacist goes on to ask
        decision = decision_truth(future)
        if decision == "continue" and not info:  # nothing to reward a question against
            continue
        samples.append(dict(cid=f"{session_id}_{n}", session_id=session_id,
                            diagn=complaint["diagn"], messages=context,
                            decision_truth=decision, info_truth=info, expert_turn=expert_turn(future)))
    return samples


def build():
    """Both splits as lists of samples, whole sessions to one split so none is in train and test."""
    rng = random.Random(SEED)
    splits = {"train": [], "test": []}
    session_id = 0
    for name, target in [("train", TRAIN_SAMPLES), ("test", TEST_SAMPLES)]:
        while len(splits[name]) < target:
            session_id += 1
            complaint = rng.choice(COMPLAINTS)
            msgs, asks = make_session(rng, complaint)
            splits[name] += session_samples(session_id, complaint, msgs, asks)
    return splits


def main():
    for name, samples in build().items():
        with open(HERE / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        stops = sum(s["decision_truth"] == "stop" for s in samples)
        sessions = len({s["session_id"] for s in samples})
        print(f"{name}: {len(samples)} samples from {sessions} sessions, "
              f"{stops} stop ({stops / len(samples):.0%})")


if __name__ == "__main__":
    main()
