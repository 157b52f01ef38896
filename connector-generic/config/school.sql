-- The sample school register (fictitious data) that onceonly-connector
-- serves in the demo: school-leaving certificates (Abiturzeugnisse) keyed
-- by the holder's IDNr. Create the SQLite file with
--   sqlite3 school.db < school.sql
-- (the demo creates it itself).
CREATE TABLE certificates (
    idnr       TEXT NOT NULL,      -- the holder's IDNr (11 digits)
    name       TEXT NOT NULL,
    birth_date TEXT NOT NULL,      -- ISO 8601
    school     TEXT NOT NULL,
    year       INTEGER NOT NULL,   -- year of the certificate
    grade      TEXT NOT NULL       -- overall grade, e.g. "1,7"
);
CREATE INDEX certificates_by_idnr ON certificates (idnr);
INSERT INTO certificates VALUES
    ('82281866209', 'Anna Lena Schneider', '1990-04-12', 'Heinrich-Hertz-Gymnasium Berlin', 2009, '1,7'),
    ('21641045750', 'Jonas Weber', '1985-11-03', 'Goethe-Gymnasium München', 2004, '2,3'),
    -- Two certificates of one person: without `year` the lookup is ambiguous.
    ('47782602413', 'Mehmet Yılmaz', '1992-02-28', 'Abendgymnasium Köln', 2012, '2,8'),
    ('47782602413', 'Mehmet Yılmaz', '1992-02-28', 'Kolleg Hamburg', 2015, '1,9');
